"""The eager paths' Triton kernels (engine/fused.py: RMSNorm, RoPE, SwiGLU's activation), run on the CPU by
Triton's interpreter: each equals the formula it replaces on ragged and strided shapes, and a dense and a
mixture-of-experts model prefill and decode the same greedy tokens (and near-equal logits) with and without them.
On GPUs the same kernels are compiled; tests/gpu_check.py covers them there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tiny_models import checks_env

pytest.importorskip("triton")

CHECK = r"""
import os
import torch
import torch.nn.functional as F
from mistral_chat.bench import random_model
from mistral_chat.engine import fused
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.model import RMSNorm, apply_rope, rope_tables
from tiny_models import greedy_past_the_window

gen = torch.Generator().manual_seed(0)
def off(fn):  # the plain formula: the same call with the kernels switched off
    os.environ["MISTRAL_CHAT_FUSED_KERNELS"] = "0"
    try:
        return fn()
    finally:
        os.environ["MISTRAL_CHAT_FUSED_KERNELS"] = "1"

for dtype in (torch.float32, torch.bfloat16):
    exact = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for dim in (50, 64):
        norm = RMSNorm(dim, 1e-5).to(dtype)
        norm.weight.data = torch.randn(dim, generator=gen).to(dtype)
        x = torch.randn(3, 5, 2 * dim, generator=gen).to(dtype)[..., ::2]  # strided rows
        assert fused.available(x)
        torch.testing.assert_close(norm(x), off(lambda: norm(x)), **exact)
    table = rope_tables(16, 40, 10000.0, torch.device("cpu"))[7:12]  # positions 7..11
    qkv = torch.randn(2, 5, (3 + 2 * 1) * 16, generator=gen).to(dtype)
    q = qkv[..., :48].view(2, 5, 3, 16)  # 3 heads: padded to 4 inside; rows strided like the model's split
    assert fused.rope_fits(q)
    torch.testing.assert_close(apply_rope(q, table), off(lambda: apply_rope(q, table)), **exact)
    for hidden in (37, 1500):
        gate_up = torch.randn(4, 2 * hidden, generator=gen).to(dtype) * 3
        torch.testing.assert_close(fused.silu_and_mul(gate_up), off(lambda: fused.silu_and_mul(gate_up)), **exact)

calls = []
for name in ("rms_norm", "rope", "swiglu"):
    kernel = getattr(fused, name)
    def counted(*args, kernel=kernel, name=name):
        calls.append(name)
        return kernel(*args)
    setattr(fused, name, counted)

for moe in (False, True):
    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                         sliding_window=16, max_seq_len=64, **(dict(num_experts=4, num_experts_per_tok=2) if moe else {}))
    torch.manual_seed(0)
    model = random_model(config, torch.device("cpu"), torch.float32, None)

    def greedy(kernels):
        os.environ["MISTRAL_CHAT_FUSED_KERNELS"] = kernels
        return greedy_past_the_window(model)
    calls.clear()
    with_kernels = greedy("1")
    assert {"rms_norm", "rope"} <= set(calls) and ("swiglu" in calls), set(calls)
    calls.clear()
    without = greedy("0")
    assert not calls
    assert with_kernels[0] == without[0], (moe, with_kernels[0], without[0])
    torch.testing.assert_close(with_kernels[1], without[1], rtol=1e-4, atol=1e-4)
os.environ["MISTRAL_CHAT_FUSED_KERNELS"] = "1"
print("ok")
"""


def test_fused_kernels_match_the_formulas_and_the_models_decode_the_same():
    env = checks_env(TRITON_INTERPRET="1")
    env.pop("MISTRAL_CHAT_FUSED_KERNELS", None)
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
