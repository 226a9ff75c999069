"""gpu_reads: the fast path from safetensors files to a GPU, run on the CPU (no pinning there) with small pieces so
that every tensor crosses several pieces and both buffers."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mistral_chat.engine.gpu_reads import GpuReader, read_header, read_tensor
from mistral_chat.errors import ModelFilesError


@pytest.fixture
def shard(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(37, 29, generator=g).to(torch.bfloat16),
        "b": torch.randn(300, 64, generator=g),
        "norm": torch.randn(29, generator=g).to(torch.float16),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_whole_tensors_rows_and_columns_read_exactly(shard):
    path, tensors = shard
    entries = read_header(path)
    assert set(entries) == set(tensors)
    reader = GpuReader(torch.device("cpu"), piece=1000, threads=3)
    try:
        for name, t in tensors.items():
            got = read_tensor(reader, path, entries[name])
            assert got.dtype == t.dtype and torch.equal(got, t)
        assert torch.equal(read_tensor(reader, path, entries["b"], rows=slice(100, 200)), tensors["b"][100:200])
        assert torch.equal(read_tensor(reader, path, entries["a"], cols=slice(7, 20)), tensors["a"][:, 7:20])
    finally:
        reader.close()


def test_a_truncated_file_is_named_before_reading(shard):
    path, _ = shard
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ModelFilesError, match="truncated or corrupt"):
        read_header(path)


def test_a_bad_header_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    header = json.dumps({"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 6]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ModelFilesError, match="tensor 'x'"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ModelFilesError, match="truncated or corrupt"):
        read_header(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tiny_models import write_tiny_model

    root = tmp_path_factory.mktemp("gpu-reads")
    return {kind: write_tiny_model(root / kind, kind, shard_hf=True) for kind in ("mistral", "mixtral")}


@pytest.mark.parametrize("fmt", ["native", "hf"])
@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_checkpoint_state_through_the_gpu_path_equals_the_cpu_path(tiny_models, kind, fmt, rank, world):
    """The loader's tensors (HF q/k reordering, fused projections, Mixtral's stacked experts, a tensor-parallel
    rank's rows and columns) are the same read either way."""
    from mistral_chat.engine.config import load_config
    from mistral_chat.engine.parallel.sharding import Parallel
    from mistral_chat.engine.weights import CheckpointReader, checkpoint_state, plain_convert

    path = tiny_models[kind][fmt]
    config = load_config(path)
    convert = plain_convert(torch.device("cpu"), torch.float32)
    expected = checkpoint_state(CheckpointReader(path, config.checkpoint_format), config, Parallel(rank, world),
                                convert)
    reader = CheckpointReader(path, config.checkpoint_format)
    reader._gpu = GpuReader(torch.device("cpu"), piece=4096, threads=2)
    got = checkpoint_state(reader, config, Parallel(rank, world), convert)
    reader.close()
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
