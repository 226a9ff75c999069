"""int8 weight-only quantization stays close to the full-precision model on the tiny checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistral_chat.engine.loader import load_model
from mistral_chat.engine.quant import Int8Linear, quantize_rows
from tiny_models import random_model, write_tiny_model


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


def test_int8_projections_follow_the_plan():
    """prepare_int8 gives each int8 projection the model's plan: its int8 kernel (one row) and fused SwiGLU
    activation; int8 experts never take the experts' GEMV kernels, whatever the plan."""
    from mistral_chat.engine.config import ModelConfig
    from mistral_chat.engine.kernels.experts_gemv import use_experts_kernel
    from mistral_chat.engine.moe import MoEFeedForward
    from mistral_chat.engine.plan import KernelPlan

    config = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=100,
                         num_experts=4, num_experts_per_tok=2)
    for plan in (KernelPlan(), KernelPlan(fused=True, int8="triton", moe="triton")):
        model = random_model(config, quantize="int8", plan=plan)  # nothing runs: the CPU has no kernels here
        assert model.plan is plan
        int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
        assert len(int8) == 2 * 2 + 1  # wqkv and wo of 2 layers, and the output (the experts are stacked)
        assert all(m.kernel == (plan.int8 == "triton") and m.fused == plan.fused for m in int8)
        experts = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
        assert all(m.w13.dtype == torch.int8 and m.row_kernel == (plan.moe == "triton") for m in experts)
        assert not any(use_experts_kernel(torch.zeros(1, 1, 32), m.w13, m.row_kernel) for m in experts)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"), reason="no CPU int8 matmul in this torch")
def test_the_cpu_int8_matmul_equals_dequantize_and_is_kept_to_the_sizes_it_handles():
    """The plan's int8=packed (the CPU with bf16): torch's int8 weight matmul, the same products up to bf16
    rounding; an input size it mishandles (not a multiple of 16) takes the plain product."""
    from mistral_chat.engine.config import ModelConfig

    config = ModelConfig(dim=64, n_layers=1, head_dim=16, hidden_dim=100, n_heads=4, n_kv_heads=2, vocab_size=100)
    packed = random_model(config, dtype=torch.bfloat16, quantize="int8", int8="packed")
    plain = random_model(config, dtype=torch.bfloat16, quantize="int8", int8="torch")
    ffn = packed.layers[0].feed_forward
    assert ffn.w13.packed and not ffn.w2.packed  # w2's input size is 100
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    for a, b in ((ffn.w13, plain.layers[0].feed_forward.w13), (packed.output, plain.output)):
        want = F.linear(x.float(), b.weight.float()) * b.scale.float()
        torch.testing.assert_close(a(x).float(), want, rtol=0.02, atol=0.02)
    h = torch.randn(2, 100).bfloat16()
    torch.testing.assert_close(ffn.w2(h), plain.layers[0].feed_forward.w2(h))
