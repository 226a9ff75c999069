"""int8 weight-only quantization stays close to the full-precision model on the tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

from mistral_chat.engine.loader import load_model
from mistral_chat.engine.quant import quantize_rows
from tiny_models import write_tiny_model


def test_quantize_rows_round_trip():
    w = torch.randn(64, 128)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (q.float() * scale[:, None] - w).abs().max()
    assert err <= scale.max() / 2 + 1e-6


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_int8_logits_and_greedy_tokens_close_to_float(tmp_path, kind):
    path = write_tiny_model(tmp_path, kind)["native"]
    full = load_model(path, device="cpu", dtype="float32")
    int8 = load_model(path, device="cpu", dtype="float32", quantize="int8")
    assert int8.model.layers[0].attention.wqkv.weight.dtype == torch.int8
    ids = torch.randint(3, 30000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full.model.setup_cache(128)
        int8.model.setup_cache(128)
        a = full.model(ids, 0, all_logits=True)
        b = int8.model(ids, 0, all_logits=True)
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.05, rel
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
