"""The eager paths' Triton kernels (engine/fused.py: RMSNorm, RoPE, SwiGLU's activation, and decode's RoPE with
the cache writes), run on the CPU by
Triton's interpreter: each equals the formula it replaces on ragged and strided shapes, and a dense and a
mixture-of-experts model prefill and decode the same greedy tokens (and near-equal logits) with and without them
(the plan's `fused`).
On GPUs the same kernels are compiled; benchmarks/gpu/check.py covers them there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tiny_models import checks_env, compile_for_hopper

pytest.importorskip("triton")

CHECK = r"""
import torch
import torch.nn.functional as F
from mistral_chat.engine.kernels import fused
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.cache import LayerKVCache
from mistral_chat.engine.model import RMSNorm, apply_rope, rope_tables
from tiny_models import greedy_past_the_window, random_model

gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    exact = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for dim in (50, 64):
        norm, plain = RMSNorm(dim, 1e-5, kernel=True).to(dtype), RMSNorm(dim, 1e-5).to(dtype)  # kernel, formula
        norm.weight.data = plain.weight.data = torch.randn(dim, generator=gen).to(dtype)
        x = torch.randn(3, 5, 2 * dim, generator=gen).to(dtype)[..., ::2]  # strided rows
        torch.testing.assert_close(norm(x), plain(x), **exact)
        delta = torch.randn(3, 5, dim, generator=gen).to(dtype)
        total, normed = norm.add_and_norm(x, delta)
        want_total, want = plain.add_and_norm(x, delta)
        torch.testing.assert_close(total, want_total, **exact)  # bf16: the interpreter rounds by truncation
        torch.testing.assert_close(normed, want, **exact)
    table = rope_tables(16, 40, 10000.0, torch.device("cpu"))[7:12]  # positions 7..11
    qkv = torch.randn(2, 5, (3 + 2 * 1) * 16, generator=gen).to(dtype)
    q = qkv[..., :48].view(2, 5, 3, 16)  # 3 heads: padded to 4 inside; rows strided like the model's split
    assert fused.rope_fits(q)
    torch.testing.assert_close(apply_rope(q, table, kernel=True), apply_rope(q, table), **exact)
    # decode's RoPE and cache writes in one kernel: 2 sequences, 3 tokens each, 4 query heads sharing 2 KV heads
    qkv = torch.randn(2, 3, (4 + 2 * 2) * 16, generator=gen).to(dtype)
    slots, table3 = torch.tensor([5, 0, 9]), table[:3]
    cache = LayerKVCache(2, 2, 12, 16, dtype, torch.device("cpu"))
    assert fused.rope_and_cache_fits(16) and not fused.rope_and_cache_fits(24)
    q_got = fused.rope_and_cache(qkv, table3, slots, cache.k, cache.v, 4)
    k_got, v_got = cache.k.clone(), cache.v.clone()
    q, k, v = qkv.split([64, 32, 32], dim=-1)
    q_want = apply_rope(q.view(2, 3, 4, 16), table3, kernel=True)
    cache.k.zero_(), cache.v.zero_()
    k_roped = apply_rope(k.view(2, 3, 2, 16), table3, kernel=True)
    cache.update(slots, k_roped.transpose(1, 2), v.view(2, 3, 2, 16).transpose(1, 2))
    assert torch.equal(q_got, q_want) and torch.equal(k_got, cache.k) and torch.equal(v_got, cache.v), dtype
    # each sequence at positions of its own (continuous batching's rows): table [B, T, D/2, 2], slots [B, T],
    # into rows 1-2 of a 3-row cache (a view), as the same kernel on each sequence alone
    tables, row_slots = torch.stack([table[:3], table[2:5]]), torch.tensor([[5, 0, 9], [1, 2, 3]])
    rows = LayerKVCache(3, 2, 12, 16, dtype, torch.device("cpu"))
    q_rows = fused.rope_and_cache(qkv, tables, row_slots, rows.k[1:], rows.v[1:], 4)
    for i in range(2):
        alone = LayerKVCache(1, 2, 12, 16, dtype, torch.device("cpu"))
        q_alone = fused.rope_and_cache(qkv[i:i + 1], tables[i], row_slots[i], alone.k, alone.v, 4)
        assert torch.equal(q_rows[i:i + 1], q_alone) and torch.equal(rows.k[1 + i:2 + i], alone.k), (i, dtype)
        assert torch.equal(rows.v[1 + i:2 + i], alone.v), (i, dtype)
    assert not rows.k[0].any() and not rows.v[0].any()
    for hidden in (37, 1500):
        gate_up = torch.randn(4, 2 * hidden, generator=gen).to(dtype) * 3
        torch.testing.assert_close(fused.silu_and_mul(gate_up, kernel=True), fused.silu_and_mul(gate_up), **exact)

calls = []
for name in ("add_rms_norm", "swiglu", "rope_and_cache"):
    kernel = getattr(fused, name)
    def counted(*args, kernel=kernel, name=name):
        calls.append(name)
        return kernel(*args)
    setattr(fused, name, counted)

for moe in (False, True):
    experts = dict(num_experts=4, num_experts_per_tok=2) if moe else {}
    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                         sliding_window=16, max_seq_len=64, **experts)
    torch.manual_seed(0)
    model = random_model(config)  # the plan the loader chooses here: the kernels on (Triton's interpreter)
    assert model.plan.fused, model.plan
    plain = random_model(config, fused=False)  # the same weights and plan, but the formulas
    calls.clear()
    with_kernels = greedy_past_the_window(model)
    assert set(calls) == {"add_rms_norm", "swiglu", "rope_and_cache"}, set(calls)
    calls.clear()
    without = greedy_past_the_window(plain)
    assert not calls
    assert with_kernels[0] == without[0], (moe, with_kernels[0], without[0])
    torch.testing.assert_close(with_kernels[1], without[1], rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.slow
def test_fused_kernels_match_the_formulas_and_the_models_decode_the_same():
    env = checks_env(TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_rope_and_cache_compiles_for_hopper():
    """Decode's RoPE-and-cache kernel compiled for an H100 (sm_90) with Triton's own ptxas, as the GPU would, with
    programmatic dependent launch's wait (fused.pdl) and without."""
    pytest.importorskip("triton")
    from mistral_chat.engine.kernels import fused

    names = ["qkv_ptr", "rope_ptr", "slots_ptr", "q_ptr", "k_ptr", "v_ptr", "t", "n_q", "n_kv", "stride_row",
             "rope_b", "slots_b", "sk_b", "sk_h", "sk_s", "sv_b", "sv_h", "sv_s"]
    types = ["*bf16", "*fp32", "*i64", "*bf16", "*bf16", "*bf16"] + ["i32"] * 12
    for pdl in (True, False):
        kernel = compile_for_hopper(fused._rope_and_cache_kernel, dict(zip(names, types)),
                                    {"HALF": 64, "HEADS": fused.ROPE_CACHE_HEADS, "PDL": pdl})
        assert ("griddepcontrol.wait" in kernel.asm["ptx"]) == pdl


def test_programmatic_dependent_launch_only_on_gpus():
    """fused.pdl: off the GPU (the CPU, the interpreter) the kernels take PDL=False and no launch option, so they
    neither wait nor let the next kernel start early (on sm_90+ GPUs they always do)."""
    import torch

    from mistral_chat.engine.kernels import fused

    assert fused.pdl(torch.zeros(4)) == {"PDL": False}
