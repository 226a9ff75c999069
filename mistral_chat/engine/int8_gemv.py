"""int8 weight-only matrix-vector product for batch-1 decode, as one Triton kernel.

Decode multiplies one activation row by every weight matrix, so its speed is how fast the weights stream from
memory. `F.linear(x, w_int8.to(bf16)) * scale` may write the dequantized weight out and read it back (more
traffic than bf16 alone); this kernel reads each int8 weight once, widens it in registers, and applies the
per-row scale to the sum: half the bytes of bf16 per token.

`int8_linear(x, weight, scale)` is a torch custom op (so torch.compile and CUDA graphs treat it as one opaque
call); `Int8Linear` uses it for a single activation row on CUDA with Triton installed and
MISTRAL_CHAT_INT8_KERNEL=1 (opt-in until measured on a GPU), and the plain product otherwise. The tests run the
kernel on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: the plain product is used
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on x's device (CUDA with Triton, or the CPU under Triton's interpreter)."""
    return triton is not None and (x.is_cuda or INTERPRETED)


if triton is not None:
    # batch-1 decode streams the weight: the configurations differ in how many bytes each program keeps in
    # flight (rows x columns per step, pipelined stages) and in how many programs share the rows; each keeps
    # 64 float32 partial sums per thread (BLOCK_N * BLOCK_K / (32 * warps))
    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, k, w, s in ((16, 512, 4, 1), (32, 256, 4, 1), (8, 1024, 4, 1), (4, 2048, 4, 1),
                                   (16, 1024, 8, 1), (32, 512, 8, 1), (8, 2048, 8, 1), (16, 512, 4, 3),
                                   (8, 1024, 4, 3), (16, 1024, 8, 3))]
    if INTERPRETED:  # the interpreter is slow: one small configuration
        _CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]

    @triton.autotune(configs=_CONFIGS, key=["N", "K"])
    @triton.jit
    def _int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, K, stride_wn,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        # partial sums stay per lane through the loop and are reduced across the threads once, at the end (a
        # reduction in every step of the loop stalls the loads behind shuffles)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0).to(tl.float32)
            acc += w * x[None, :]
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, (tl.sum(acc, axis=1) * scale).to(out_ptr.dtype.element_ty), mask=row_ok)


@torch.library.custom_op("mistral_chat::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ([..., K], one row in all) times weight ([N, K] int8) transposed, each output scaled by scale ([N])."""
    assert triton is not None, "int8_linear needs Triton"
    k = x.shape[-1]
    n = weight.shape[0]
    x_row = x.reshape(k).contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _int8_gemv_kernel[grid](x_row, weight, scale, out, n, k, weight.stride(0))
    return out.reshape(*x.shape[:-1], n)


@int8_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
