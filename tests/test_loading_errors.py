"""`load_model` on folders a user can get wrong: each raises the right `MistralChatError`, with one line that names
the file or value (test_cli.py checks how the command prints them). Out of memory while reading weights becomes a
DeviceError that says what to try (test_cli.py runs out of memory for real, under a memory limit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mistral_chat.engine.loader import load_model
from mistral_chat.errors import DeviceError, ModelFilesError, TokenizerError
from test_cli import broken_models
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "mistral")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny) -> dict[str, Path]:
    return broken_models(tmp_path_factory.mktemp("bad"), tiny["native"], tiny["hf"])


@pytest.mark.parametrize("case, error, text", [
    ("missing", ModelFilesError, "does not exist"),
    ("empty", ModelFilesError, "neither params.json"),
    ("llama", ModelFilesError, "model_type 'llama'"),
    ("truncated", ModelFilesError, "truncated or corrupt"),
    ("shape", ModelFilesError, "params.json says"),
    ("no-tokenizer", TokenizerError, "no tokenizer"),
])
def test_bad_folder(bad, case, error, text):
    with pytest.raises(error) as info:
        load_model(bad[case], device="cpu")
    message = str(info.value)
    assert text in message and str(bad[case]) in message
    assert "\n" not in message


@pytest.mark.parametrize("device, dtype, text", [("cpu", "int3", "dtype 'int3'"), ("cuda", "auto", "device 'cuda'"),
                                                 ("tpu", "auto", "device 'tpu'")])
def test_bad_device_or_dtype(tiny, device, dtype, text):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match=text):
        load_model(tiny["native"], device=device, dtype=dtype)


def test_out_of_memory_reading_weights_is_a_device_error(tiny):
    """Progress is reported between tensors, inside the loading that runs out of memory on a real GPU: a callback
    that raises the allocator's error stands in for the next tensor's allocation failing."""

    def progress(done: int, total: int) -> None:
        if done == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(DeviceError) as info:
        load_model(tiny["native"], device="cpu", progress=progress)
    message = str(info.value)
    assert message.startswith("out of memory on cpu loading native") and "--quantize int8" in message

    def cpu_progress(done: int, total: int) -> None:  # what the CPU allocator raises (a plain RuntimeError)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(DeviceError, match="out of memory on cpu"):
        load_model(tiny["native"], device="cpu", progress=cpu_progress)

    def other_error(done: int, total: int) -> None:  # anything else is not disguised as out of memory
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        load_model(tiny["native"], device="cpu", progress=other_error)



@pytest.mark.parametrize("fmt, index_name, weights_name", [
    ("native", "consolidated.safetensors.index.json", "consolidated.safetensors"),
    ("hf", "model.safetensors.index.json", "model.safetensors"),
])
@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors", "..\\x"])
def test_index_naming_shards_outside_the_folder_is_refused(tmp_path, tiny, fmt, index_name, weights_name, shard):
    """A weight_map entry with path parts (`../../etc/passwd`) would read a file outside the model's folder."""
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny[fmt], folder)
    outside = tmp_path / "outside.safetensors"
    (folder / weights_name).rename(outside)  # a real checkpoint, so that only the path check can refuse it
    shard = str(outside) if shard == "ABSOLUTE" else shard
    from safetensors import safe_open

    with safe_open(str(outside), framework="pt") as f:
        weight_map = {name: shard for name in f.keys()}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ModelFilesError) as info:
        load_model(folder, device="cpu")
    message = str(info.value)
    assert "outside its folder" in message and index_name in message and "\n" not in message


def test_index_whose_weight_map_is_not_an_object_is_refused(tmp_path, tiny):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny["native"], folder)
    (folder / "consolidated.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(ModelFilesError, match="not a valid safetensors index"):
        load_model(folder, device="cpu")
