"""int8 weight-only matrix-vector product for batch-1 decode, as one Triton kernel.

Decode multiplies one activation row by every weight matrix, so its speed is how fast the weights stream from
memory. `F.linear(x, w_int8.to(bf16)) * scale` may write the dequantized weight out and read it back (more
traffic than bf16 alone); this kernel reads each int8 weight once, four to a 32-bit word, turns each byte into a
float with bit operations, and applies the per-row scale to the sum: half the bytes of bf16 per token.

`int8_linear(x, weight, scale)` is a torch custom op (so torch.compile and CUDA graphs treat it as one opaque
call); `Int8Linear` uses it for a single activation row on CUDA with Triton installed (unless
MISTRAL_CHAT_INT8_KERNEL=0), and the plain product otherwise. Inductor's own compiled product converts each int8
with an int-to-float instruction; alone on an H100, from cold weights, it read Mistral-7B's matrices at 34-87% of
the copy bandwidth, this kernel at 67-98% (tests/gpu_int8_gemv.py). The tests run the kernel on the CPU through
Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from mistral_chat.engine.fused import INTERPRETED, pdl_launch, triton_runs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: the plain product is used
    triton = None

available = triton_runs  # where the kernel can run: CUDA with Triton, or the CPU under Triton's interpreter


if triton is not None:
    # batch-1 decode streams the weight: the configurations differ in how many bytes each program keeps in
    # flight (rows x words per step, pipelined stages) and in how many programs share the rows
    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=warps, num_stages=s)
                for n, w, warps, s in ((8, 256, 4, 1), (16, 128, 4, 1), (4, 512, 4, 1), (8, 256, 4, 3),
                                       (4, 256, 4, 4), (2, 512, 4, 3), (16, 256, 8, 2), (8, 512, 8, 2),
                                       (32, 128, 8, 2), (1, 1024, 4, 3), (2, 256, 2, 4), (4, 128, 2, 4))]
    if INTERPRETED:  # the interpreter is slow: one small configuration
        _CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_W": 16}, num_warps=4)]

    _MAGIC = tl.constexpr(0x4B000000)  # the float32 bits of 2**23: OR-ing a byte in gives 2**23 + byte exactly
    _OFFSET = tl.constexpr(8388736.0)  # 2**23 + 128

    @triton.autotune(configs=_CONFIGS, key=["N", "WORDS"])
    @triton.jit
    def _int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, WORDS, stride_wn,
                          BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr):
        """out[n] = scale[n] * sum_k w[n, k] * x[k], reading w ([N, 4 * WORDS] int8) as int32 words of 4 weights.

        Each byte becomes a float by bit operations (its value + 128 placed in the mantissa of 2**23, then one
        subtraction) instead of an int-to-float conversion instruction, which GPUs issue at a fraction of the
        rate of float arithmetic and which, at one per weight, held the product below the memory's speed. Each
        step loads the next step's words before it computes (with PDL, the first words load before the wait
        for the kernel that wrote x)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows[:, None] < N
        words = tl.arange(0, BLOCK_W)
        w_rows = w_ptr + rows[:, None] * stride_wn
        packed = tl.load(w_rows + words[None, :], mask=row_ok & (words[None, :] < WORDS), other=0)
        if PDL:  # the weights never change; x is the previous kernel's output
            tl.extra.cuda.gdc_wait()
        # partial sums stay per lane through the loop and are reduced across the threads once, at the end (a
        # reduction in every step of the loop stalls the loads behind shuffles)
        acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        for w0 in range(0, WORDS, BLOCK_W):
            word_ok = w0 + words < WORDS
            ahead = w0 + BLOCK_W + words
            packed_next = tl.load(w_rows + ahead[None, :], mask=row_ok & (ahead[None, :] < WORDS), other=0)
            for b in tl.static_range(4):  # byte b of word j is weight 4 j + b (little-endian)
                x = tl.load(x_ptr + (w0 + words) * 4 + b, mask=word_ok, other=0.0).to(tl.float32)
                biased = ((packed >> (8 * b)) & 0xFF) ^ 0x80  # the signed byte s as s + 128, in 0..255
                weight = (biased | _MAGIC).to(tl.float32, bitcast=True) - _OFFSET
                acc += weight * x[None, :]
            packed = packed_next
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, (tl.sum(acc, axis=1) * scale).to(out_ptr.dtype.element_ty), mask=row_ok)


def fits(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this int8 weight ([N, K]): rows of whole, aligned 4-byte words."""
    return weight.stride(-1) == 1 and weight.shape[-1] % 4 == 0 and weight.stride(0) % 4 == 0


@torch.library.custom_op("mistral_chat::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ([..., K], one row in all) times weight ([N, K] int8) transposed, each output scaled by scale ([N])."""
    assert triton is not None, "int8_linear needs Triton"
    k = x.shape[-1]
    n = weight.shape[0]
    x_row = x.reshape(k).contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    if weight.storage_offset() % 4:  # a view that starts mid-word (loaded weights never do)
        weight = weight.clone()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    pdl = pdl_launch(x)
    _int8_gemv_kernel[grid](x_row, weight.view(torch.int32), scale, out, n, k // 4, weight.stride(0) // 4, PDL=pdl,
                            **({"launch_pdl": True} if pdl else {}))
    return out.reshape(*x.shape[:-1], n)


@int8_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
