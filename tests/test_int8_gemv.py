"""The Triton int8 matrix-vector kernel (engine/int8_gemv.py), run on the CPU by Triton's interpreter: it equals
the dequantize-and-multiply product on ragged shapes, and an int8 model decodes the same greedy tokens with it
(the plan's int8=triton) as without it (int8=torch), eager and compiled. (On a GPU the same kernel is compiled;
benchmarks/gpu/check.py and the bench cover that.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tiny_models import checks_env, compile_for_hopper

pytest.importorskip("triton")

CHECK = r"""
import torch
import torch.nn.functional as F
from mistral_chat.engine.kernels import fused, int8_gemv
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.quant import Int8Linear, quantize_rows
from tiny_models import count_calls, greedy_past_the_window, random_model
assert not int8_gemv.BYTE_PERMUTE  # the interpreter runs the portable bit operations

gen = torch.Generator().manual_seed(0)
for n, k in ((50, 200), (16, 64), (33, 100)):  # neither a multiple of the blocks
    w = torch.randn(n, k, generator=gen)
    q, scale = quantize_rows(w)
    x = torch.randn(1, 1, k, generator=gen)
    got = int8_gemv.int8_linear(x, q, scale)
    want = F.linear(x, q.float()) * scale
    assert got.shape == (1, 1, n), got.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # SwiGLU in the kernel's last step (w13): gate rows, then up rows; equal to the activation of the product
    swiglu = int8_gemv.int8_linear(x, q, scale, swiglu=True) if n % 2 == 0 else None
    if swiglu is not None:
        assert swiglu.shape == (1, 1, n // 2), swiglu.shape
        assert torch.equal(swiglu, fused.silu_and_mul(got, kernel=True))

config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                     sliding_window=16, max_seq_len=64)
torch.manual_seed(0)
model = random_model(config, quantize="int8")  # the plan the loader chooses here: the kernel (Triton's interpreter)
plain = random_model(config, quantize="int8", int8="torch")  # the same weights, dequantized then multiplied
assert model.plan.int8 == "triton", model.plan
int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
assert len(int8) == 9 and all(m.kernel for m in int8)  # wqkv, wo, w13, w2 of 2 layers, and the output
assert not any(m.kernel for m in plain.modules() if isinstance(m, Int8Linear))
assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
calls = count_calls(int8_gemv, "int8_linear")  # quant.Int8Linear looks it up on the module at each call

with_kernel = greedy_past_the_window(model)
# each decode step: wqkv, wo, w13, w2 of 2 layers and the output; the prompt: only its last row's output
assert len(calls) == 20 * 9 + 1, len(calls)
without = greedy_past_the_window(plain)
assert len(calls) == 181
assert with_kernel[0] == without[0], (with_kernel[0], without[0])
torch.testing.assert_close(with_kernel[1], without[1], rtol=1e-4, atol=1e-4)

# compiled decode calls the kernel as one opaque custom op (as CUDA graphs will on a GPU): same tokens
ids = greedy_past_the_window(model, compiled=True)[0]
assert ids == with_kernel[0], (ids, with_kernel[0])
print("ok")
"""


@pytest.mark.slow
def test_int8_kernel_matches_the_plain_product_and_the_model_decodes_the_same():
    env = checks_env(TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_the_gpu_path_compiles_for_hopper():
    """The kernel's GPU path (inline PTX: one PRMT per weight, x read as 64-bit words) cannot run on the CPU; this
    compiles it for an H100 (sm_90) with Triton's own ptxas, as the GPU would, for the shapes decode tunes over."""
    from mistral_chat.engine.kernels import int8_gemv

    signature = {"x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32",
                 "WORDS": "i32", "stride_wn": "i32", "UP": "i32"}
    for block_n, block_w, parts in ((4, 512, 1), (16, 128, 1), (8, 256, 2)):  # parts=2: SwiGLU's last step
        kernel = compile_for_hopper(int8_gemv._int8_gemv_kernel.fn, signature, {
            "BLOCK_N": block_n, "BLOCK_W": block_w, "BYTE_PERMUTE": True, "PARTS": parts})
        assert "prmt.b32" in kernel.asm["ptx"] and kernel.asm["cubin"]
