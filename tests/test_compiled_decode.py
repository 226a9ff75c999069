"""The compiled decode step (torch.compile; CUDA graphs on a GPU) agrees with eager decode on the tiny models,
on the CPU: the same greedy tokens, with the rotating cache wrapping and power-of-two cache buckets in play."""

from __future__ import annotations

import pytest
import torch

from mistral_chat.engine.decode import DecodeStep, key_bucket
from mistral_chat.engine.loader import load_model
from tiny_models import write_tiny_model


def test_key_bucket_rounds_up_to_a_power_of_two_within_the_capacity():
    assert key_bucket(0, 4096) == 256 and key_bucket(255, 4096) == 256 and key_bucket(256, 4096) == 512
    assert key_bucket(3000, 4096) == 4096 and key_bucket(5000, 4096) == 4096
    assert key_bucket(10, 23) == 23  # a small (window) cache is read whole


def greedy(model, ids: list[int], steps: int, compile: bool) -> list[int]:
    step = DecodeStep(model, compile=compile)
    with torch.no_grad():
        model.setup_cache(300, prefill_chunk=8)
        logits = None
        for start in range(0, len(ids), 8):
            logits = model(torch.tensor([ids[start:start + 8]]), start)[:, -1]
        out, pos = [], len(ids)
        for _ in range(steps):
            token = logits.argmax(-1)
            out.append(int(token[0]))
            logits = step(token.view(1, 1), pos)
            pos += 1
    return out


@pytest.mark.parametrize("quantize,regions", [(None, "0"), ("int8", "0"), (None, "1")])
def test_compiled_decode_equals_eager(tmp_path, monkeypatch, quantize, regions):
    monkeypatch.setenv("MISTRAL_CHAT_COMPILE_REGIONS", regions)  # "1": one block compiled for all layers
    loaded = load_model(write_tiny_model(tmp_path, "mistral")["native"], device="cpu", dtype="float32",
                        quantize=quantize)
    ids = torch.randint(3, 32000, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    eager = greedy(loaded.model, ids, 24, compile=False)  # window 16: the cache of 23 slots wraps
    compiled = greedy(loaded.model, ids, 24, compile=True)
    assert compiled == eager
