"""The Triton kernels for Mixtral's chosen experts of one token (engine/experts_gemv.py), run on the CPU by Triton's
interpreter: they equal MoEFeedForward's gathered formula on ragged shapes (w13's also with RMSNorm's scale
inside), a Mixtral model decodes the same greedy tokens with them (the plan's moe=triton) as without; the plan
gives them the experts only under tensor parallelism; and they compile for an H100. (Compiled, at 2 ranks:
test_parallel_compiled.py's "fused-mixtral".)"""

from __future__ import annotations


import pytest
import torch

from tiny_models import compile_for_hopper, run_interpreted

CHECK = r"""
import torch
from mistral_chat.engine.kernels import experts_gemv, fused
from mistral_chat.engine.config import ModelConfig
from tiny_models import count_calls, greedy_past_the_window, random_model

gen = torch.Generator().manual_seed(0)
for experts_n, dim, hidden, k in ((8, 64, 96, 2), (4, 33, 50, 2), (5, 100, 70, 3), (3, 16, 8, 1)):
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        w13 = torch.randn(experts_n, 2 * hidden, dim, generator=gen).to(dtype)
        w2 = torch.randn(experts_n, dim, hidden, generator=gen).to(dtype)
        x = torch.randn(1, 1, dim, generator=gen).to(dtype)
        experts = torch.randperm(experts_n, generator=gen)[:k].view(1, k)
        weights = torch.softmax(torch.randn(1, k, generator=gen), -1).to(dtype)
        act = experts_gemv.experts_swiglu(x, w13, experts)
        assert act.shape == (k, hidden) and act.dtype == dtype
        gate_up = torch.einsum("d,khd->kh", x.view(dim).float(), w13[experts[0]].float()).to(dtype)
        want = fused.silu_and_mul(gate_up, kernel=True)  # the activation as the eager paths' kernel computes it
        torch.testing.assert_close(act.float(), want.float(), rtol=tol, atol=tol)
        h, g = torch.randn(dim, generator=gen).to(dtype), (torch.rand(dim, generator=gen) + 0.5).to(dtype)
        normed = experts_gemv.experts_swiglu((h * g).view(1, 1, dim), w13, experts, norm_of=h, eps=1e-5)
        hf = h.float()  # RMSNorm(h) with weight g, h * g rounded as the kernel's input is
        rms_normed = (h * g).float() * torch.rsqrt(hf.pow(2).mean() + 1e-5)
        gate_up = torch.einsum("d,khd->kh", rms_normed, w13[experts[0]].float()).to(dtype)
        want = fused.silu_and_mul(gate_up, kernel=True)
        torch.testing.assert_close(normed.float(), want.float(), rtol=tol * 2, atol=tol * 2)
        out = experts_gemv.experts_down(act, w2, experts, weights)
        assert out.shape == (dim,) and out.dtype == dtype
        each = torch.einsum("kh,kdh->kd", act.float(), w2[experts[0]].float()).to(dtype).float()
        want = (each * weights.view(k, 1).float()).sum(0)
        # (bf16: each expert's product rounded first, then summed; errors scale with the products, not the sum)
        torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol * float(each.abs().max()))

config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                     sliding_window=16, max_seq_len=64, num_experts=4, num_experts_per_tok=2)
torch.manual_seed(0)
plain = random_model(config)  # the plan for one process: the gathered experts' products by torch
assert plain.plan.moe == "torch", plain.plan
model = random_model(config, moe="triton")  # the same weights, the experts in the kernels
assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
swiglus, downs = count_calls(experts_gemv, "experts_swiglu"), count_calls(experts_gemv, "experts_down")

without = greedy_past_the_window(plain)
assert not swiglus and not downs
with_kernel = greedy_past_the_window(model)
assert len(swiglus) == len(downs) == 20 * 2, (len(swiglus), len(downs))  # each decode step, each layer; not the prompt
assert with_kernel[0] == without[0], (with_kernel[0], without[0])
torch.testing.assert_close(with_kernel[1], without[1], rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.slow
def test_experts_kernels_match_the_formula_and_mixtral_decodes_the_same():
    pytest.importorskip("triton")
    assert run_interpreted(CHECK, timeout=600).strip().endswith("ok")


def test_the_plan_gives_the_experts_kernels_on_gpus():
    """GPUs take the experts' kernels (the plan's moe, MoEFeedForward.row_kernel): one GPU decodes eagerly in CUDA
    graphs, where gathered experts' weights would be copied; int8 experts and several rows never."""
    from mistral_chat.engine.kernels import experts_gemv
    from mistral_chat.engine.config import ModelConfig
    from mistral_chat.engine.model import Transformer
    from mistral_chat.engine.moe import MoEFeedForward
    from mistral_chat.engine.parallel.sharding import Parallel
    from mistral_chat.engine.plan import KernelPlan, choose_plan

    cuda = torch.device("cuda")
    assert choose_plan(cuda, torch.bfloat16, 1).moe == "triton"
    assert choose_plan(cuda, torch.bfloat16, 2).moe == "triton"
    assert choose_plan(torch.device("cpu"), torch.bfloat16, 1).moe == "torch"
    config = ModelConfig(dim=64, n_layers=1, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                         num_experts=4, num_experts_per_tok=2)
    with torch.device("meta"):
        one = Transformer(config, plan=choose_plan(cuda, torch.bfloat16, 1))
        two = Transformer(config, Parallel(rank=0, world=2), choose_plan(cuda, torch.bfloat16, 2))
        plain = Transformer(config)
        forced = Transformer(config, plan=KernelPlan(moe="triton"))
    experts = {name: [m.row_kernel for m in model.modules() if isinstance(m, MoEFeedForward)]
               for name, model in (("one", one), ("two", two), ("plain", plain), ("forced", forced))}
    assert experts == {"one": [True], "two": [True], "plain": [False], "forced": [True]}
    use = experts_gemv.use_experts_kernel
    row, w13 = torch.zeros(1, 1, 8), torch.zeros(4, 6, 8)
    assert use(row, w13, True) and not use(row, w13, False)
    assert not use(torch.zeros(2, 8), w13, True) and not use(row, w13.to(torch.int8), True)


def test_the_experts_kernels_compile_for_hopper():
    """Compiled for an H100 (sm_90) with Triton's own ptxas: w13's (SwiGLU, one expert a program, with and without
    the norm's scale) and w2's (the k experts summed in each program; storing, or pushing into the Lamport
    all-reduce's buffers), with programmatic dependent launch: the wait comes before any load, since the
    expert ids come from the kernel before."""
    from mistral_chat.engine.kernels import experts_gemv

    signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "experts_ptr": "*i64",
                 "weights_ptr": "*bf16", "N": "i32", "K": "i32", "stride_x": "i32", "stride_we": "i64",
                 "stride_wn": "i32", "UP": "i32", "norm_ptr": "*bf16", "eps": "fp32", "buffers_ptr": "*i64",
                 "counters_ptr": "*i32", "capacity": "i32"}
    cases = ((4, 512, 2, False, True, False), (8, 256, 2, False, False, False), (8, 256, 1, True, False, False),
             (1, 2048, 1, True, False, False), (4, 512, 1, True, False, True))
    for block_n, block_k, parts, summed, norm, send in cases:
        ptx = compile_for_hopper(experts_gemv._experts_kernel.fn, signature, {
            "BLOCK_N": block_n, "BLOCK_K": block_k, "PARTS": parts, "SLOTS": 2, "SUM": summed, "NORM": norm,
            "SEND": send, "RANK": 1 if send else 0, "WORLD": 2 if send else 1, "SEND_BLOCK": 1024 if send else 1,
            "PDL": True}).asm["ptx"]
        assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")
