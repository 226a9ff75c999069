"""The Triton matrix-vector kernel for float weights (engine/gemv.py), run on the CPU by Triton's interpreter: it
equals F.linear on ragged shapes (with the norm's scale read in one load, and in a loop past 8192 columns), and a
model whose plan gives it the products (gemv=triton) decodes the same greedy tokens as one whose plan does not,
eager and compiled; and which plans use it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tiny_models import checks_env, compile_for_hopper

CHECK = r"""
import torch
import torch.nn.functional as F
import triton
from mistral_chat.engine.kernels import fused, gemv
from mistral_chat.engine.config import ModelConfig
from tiny_models import count_calls, greedy_past_the_window, random_model

gen = torch.Generator().manual_seed(0)
for n, k in ((50, 200), (16, 64), (33, 100), (7, 31)):  # neither a multiple of the blocks
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        w = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(1, 1, k, generator=gen).to(dtype)
        got = gemv.linear_row(x, w)
        assert got.shape == (1, 1, n) and got.dtype == dtype, (got.shape, got.dtype)
        torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), rtol=tol, atol=tol)
        h, g = torch.randn(k, generator=gen).to(dtype), torch.rand(k, generator=gen).to(dtype) + 0.5
        normed = gemv.linear_row((h * g).view(1, 1, k), w, norm_of=h, eps=1e-5)  # RMSNorm(h) with weight g
        hf = h.float()
        want = F.linear((hf * torch.rsqrt(hf.pow(2).mean() + 1e-5) * g.float()).view(1, 1, k), w.float())
        torch.testing.assert_close(normed.float(), want, rtol=tol * 2, atol=tol * 2)
        wide = gemv.linear_row(x, w, float_out=True)  # the logits' product keeps its float32 sums
        assert wide.dtype == torch.float32
        torch.testing.assert_close(wide, F.linear(x.float(), w.float()), rtol=1e-5, atol=1e-4)
        if dtype == torch.bfloat16:
            assert not torch.equal(wide, got.float())  # not rounded to bf16
        if n % 2 == 0:  # SwiGLU in the last step (w13): the activation of the same product, bit for bit
            swiglu = gemv.linear_row(x, w, swiglu=True)
            assert swiglu.shape == (1, 1, n // 2)
            assert torch.equal(swiglu, fused.silu_and_mul(got, kernel=True))

# past 8192 columns the norm's scale is computed from h in a loop of BLOCK_K columns, not in one load
assert gemv._norm_block(8192) == 8192 and gemv._norm_block(8200) == 0
n, k = 5, 8200
w, h, g = torch.randn(n, k, generator=gen), torch.randn(k, generator=gen), torch.rand(k, generator=gen) + 0.5
looped = gemv.linear_row((h * g).view(1, 1, k), w, norm_of=h, eps=1e-5)
want = F.linear((h * torch.rsqrt(h.pow(2).mean() + 1e-5) * g).view(1, 1, k), w)
torch.testing.assert_close(looped, want, rtol=1e-4, atol=1e-4)

# a configuration given for the shape (gemv.measured_config, as on Hopper GPUs) replaces autotuning's
measured = triton.Config({"BLOCK_N": 4, "BLOCK_K": 32}, num_warps=4)
asked = []
gemv.measured_config = lambda x, *shape: asked.append(shape) or measured
w, x = torch.randn(50, 200, generator=gen), torch.randn(1, 1, 200, generator=gen)
h = torch.randn(200, generator=gen)
tuned = len(gemv._gemv_kernel.cache)
torch.testing.assert_close(gemv.linear_row(x, w, swiglu=True, norm_of=h, eps=1e-5),
                           fused.silu_and_mul(F.linear(x * torch.rsqrt(h.pow(2).mean() + 1e-5), w)),
                           rtol=1e-4, atol=1e-4)
assert asked == [(25, 200, 2, 200)] and len(gemv._gemv_kernel.cache) == tuned, (asked, tuned)
gemv.measured_config = lambda *shape: None

config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                     sliding_window=16, max_seq_len=64)
torch.manual_seed(0)
plain = random_model(config)  # the plan for one process: products by torch (the other kernels on, as on a GPU)
assert plain.plan.gemv == "torch" and plain.plan.fused and plain.plan.attention == "triton", plain.plan
model = random_model(config, gemv="triton")  # the same weights, the products in the kernel
assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
calls = count_calls(gemv, "linear_row")  # gemv.Linear looks it up on the module at each call

without = greedy_past_the_window(plain)
assert not calls
with_kernel = greedy_past_the_window(model)
# each decode step: wqkv, wo, w13, w2 of 2 layers and the output; the prompt: only its last row's output
assert len(calls) == 20 * 9 + 1, len(calls)
assert with_kernel[0] == without[0], (with_kernel[0], without[0])
torch.testing.assert_close(with_kernel[1], without[1], rtol=1e-4, atol=1e-4)

# compiled decode calls the kernel as one opaque custom op (as CUDA graphs will on a GPU): same tokens
ids = greedy_past_the_window(model, compiled=True)[0]
assert ids == with_kernel[0], (ids, with_kernel[0])
assert len(calls) > 20 * 9 + 1
print("ok")
"""


@pytest.mark.slow
def test_gemv_kernel_matches_f_linear_and_the_model_decodes_the_same():
    pytest.importorskip("triton")
    env = checks_env(TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_the_plan_gives_the_kernel_the_products_on_gpus():
    """GPUs take the kernel for single-row products (one GPU: decode graphed eagerly, not compiled; each rank's
    halved matrices under --tp): the plan's gemv, which the model hands to every gemv.Linear (with its fused, for
    SwiGLU's activation outside the kernel); the CPU keeps torch's products."""
    from mistral_chat.engine.kernels import gemv
    from mistral_chat.engine.config import ModelConfig
    from mistral_chat.engine.model import Transformer
    from mistral_chat.engine.parallel.sharding import Parallel
    from mistral_chat.engine.plan import KernelPlan, choose_plan

    cuda = torch.device("cuda")
    assert choose_plan(cuda, torch.bfloat16, 1).gemv == "triton"
    assert choose_plan(cuda, torch.bfloat16, 2).gemv == "triton"
    assert choose_plan(torch.device("cpu"), torch.bfloat16, 1).gemv == "torch"
    config = ModelConfig(dim=64, n_layers=1, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200)
    with torch.device("meta"):
        one = Transformer(config)  # the default plan: plain PyTorch
        two = Transformer(config, Parallel(rank=0, world=2), choose_plan(cuda, torch.bfloat16, 2))
    linears = [m for m in one.modules() if isinstance(m, gemv.Linear)]
    assert len(linears) == 5 and not any(m.row_kernel or m.fused for m in linears)  # wqkv, wo, w13, w2, output
    assert all(m.row_kernel and m.fused for m in two.modules() if isinstance(m, gemv.Linear))
    assert two.output.float_out and one.output.float_out  # logits keep the kernel's float32 sums
    with torch.device("meta"):
        planned = Transformer(config, plan=KernelPlan(gemv="triton"))
    assert all(m.row_kernel and not m.fused for m in planned.modules() if isinstance(m, gemv.Linear))
    row, weight = torch.zeros(1, 1, 8), torch.zeros(4, 8)
    assert gemv.use_kernel(row, weight, True) and not gemv.use_kernel(row, weight, False)
    assert not gemv.use_kernel(torch.zeros(2, 8), weight, True)  # two rows: F.linear
    assert not gemv.use_kernel(row, torch.zeros(8, 4).t(), True)  # weight rows not contiguous


def test_the_kernel_compiles_for_hopper():
    """Compiled for an H100 (sm_90) with Triton's own ptxas, as the GPU would: the plain product, SwiGLU's (gate
    and up rows in one tile, the activation in the last step), with the norm's scale computed first, and pushing
    its outputs into the Lamport all-reduce's buffers; with programmatic dependent launch (fused.pdl), the first
    weights are loaded before the wait."""
    from mistral_chat.engine.kernels import gemv

    signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32",
                 "stride_wn": "i32", "UP": "i32", "norm_ptr": "*bf16", "eps": "fp32", "buffers_ptr": "*i64",
                 "counters_ptr": "*i32", "capacity": "i32"}
    for block_n, block_k, parts, norm, send, pdl in ((4, 512, 1, False, False, True), (8, 256, 2, True, False, True),
                                                     (1, 2048, 2, False, False, False), (4, 512, 1, False, True, True)):
        kernel = compile_for_hopper(gemv._gemv_kernel.fn, signature, {
            "BLOCK_N": block_n, "BLOCK_K": block_k, "PARTS": parts, "NORM": norm, "SEND": send,
            "RANK": 1 if send else 0, "WORLD": 2 if send else 1, "SEND_BLOCK": 1024 if send else 1,
            "NORM_BLOCK": 4096 if norm else 0, "PDL": pdl})
        ptx = kernel.asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == pdl
        if pdl:  # a weight load is issued before the wait
            assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait")
