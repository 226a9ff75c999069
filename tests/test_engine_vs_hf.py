"""The engine's logits and greedy tokens equal HF transformers' on tiny random checkpoints, in both formats."""

from __future__ import annotations

import pytest
import torch

from mistral_chat.engine.config import load_config
from mistral_chat.engine.model import Transformer
from mistral_chat.engine.parallel.sharding import Parallel
from mistral_chat.engine.weights import CheckpointReader, checkpoint_state, plain_convert
from tiny_models import write_tiny_model

KINDS = ["mistral", "mixtral", "nemo"]
FORMATS = ["native", "hf"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    # the Mixtral HF checkpoint is sharded, to read an index too
    return {kind: write_tiny_model(root / kind, kind, shard_hf=kind == "mixtral") for kind in KINDS}


def engine_model(path, capacity: int = 256, prefill_chunk: int = 2048) -> Transformer:
    config = load_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    reader = CheckpointReader(path, config.checkpoint_format)
    convert = plain_convert(torch.device("cpu"), torch.float32)
    model.load_state_dict(checkpoint_state(reader, config, Parallel(), convert), assign=True)
    model.eval()
    model.setup_cache(capacity, prefill_chunk=prefill_chunk)
    return model


def hf_reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (1, n), generator=g)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_logits_match_hf(tiny, kind, fmt):
    ids = prompt(40)  # longer than the mistral window of 16
    with torch.no_grad():
        expected = hf_reference(tiny[kind]["hf"])(ids).logits
        ours = engine_model(tiny[kind][fmt])(ids, start_pos=0, all_logits=True)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_hf(tiny, kind, fmt):
    """Greedy decode one token at a time; for mistral the rotating cache (window 16, chunk 8) wraps many times."""
    ids = prompt(20, seed=2)
    steps = 40
    hf = hf_reference(tiny[kind]["hf"])
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                               attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    model = engine_model(tiny[kind][fmt], capacity=128, prefill_chunk=8)
    if kind == "mistral":
        assert model.cache_capacity == 16 + 8 - 1  # bounded by the window, not the sequence
    tokens, got = ids[0].tolist(), []
    with torch.no_grad():
        pos = 0
        for start in range(0, len(tokens), 8):  # chunked prefill
            chunk = torch.tensor([tokens[start:start + 8]])
            logits = model(chunk, start_pos=pos)
            pos += chunk.shape[1]
        for _ in range(steps):
            nxt = int(logits[0, -1].argmax())
            got.append(nxt)
            logits = model(torch.tensor([[nxt]]), start_pos=pos)
            pos += 1
    assert got == expected


def test_rotating_cache_logits_equal_full_window_attention(tiny):
    """Logits of every decode step after the buffer wraps equal HF's full-sequence forward (window-masked)."""
    path = tiny["mistral"]["native"]
    ids = prompt(70, seed=3)
    with torch.no_grad():
        expected = hf_reference(tiny["mistral"]["hf"])(ids).logits[0]
        model = engine_model(path, capacity=128, prefill_chunk=4)
        got = [model(ids[:, :4], start_pos=0, all_logits=True)[0]]
        for p in range(4, 70):
            got.append(model(ids[:, p:p + 1], start_pos=p)[0])
    torch.testing.assert_close(torch.cat(got), expected, atol=1e-4, rtol=1e-4)


def test_moe_top_k_equals_torch_topk():
    """The experts' top-k as rounds of argmax (fused by inductor under torch.compile) gives torch.topk's values and
    indices, largest first, on any leading shape; at an exact tie the lower index wins."""
    from mistral_chat.engine.moe import top_k

    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 8), (37, 8), (2, 5, 8), (4, 16)):
        logits = torch.randn(shape, generator=gen)
        for k in (1, 2, 3):
            values, indices = top_k(logits, k)
            want = torch.topk(logits, k, dim=-1)
            assert torch.equal(values, want.values) and torch.equal(indices, want.indices)
    values, indices = top_k(torch.tensor([[0.5, 2.0, 1.0, 2.0, 1.0]]), 3)
    assert indices.tolist() == [[1, 3, 2]] and values.tolist() == [[2.0, 2.0, 1.0]]
