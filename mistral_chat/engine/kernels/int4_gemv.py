"""Group-wise int4 weight-only matrix-vector product for batch-1 decode, as one Triton kernel.

The weight ([N, K] as [N, K / 2] bytes, two 4-bit codes a byte, the even column in the low nibble; see
engine/int4.py) is read once, eight codes to a 32-bit word; each code becomes a float in registers and the
product is sum_k (q[n, k] * scale[n, g] + low[n, g]) * x[k] over groups g of GROUP columns, computed per word as
scale * sum(q * x) + low * sum(x): a quarter of bf16's bytes per token, plus the groups' scales and lows.

`int4_linear(x, weight, scale, low)` is a torch custom op (one opaque call for torch.compile and CUDA graphs);
`int4.Int4Linear` uses it for a single activation row where the plan's `int4` is "triton". The tests run it on the
CPU through Triton's interpreter (TRITON_INTERPRET=1) and compile it for sm_90. Measurements: docs/engine.md.
"""

from __future__ import annotations

import torch

from mistral_chat.engine.kernels.fused import AUTOTUNE_CACHE, INTERPRETED, kernel_op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: the dequantized product is used
    triton = None


if triton is not None:
    from mistral_chat.engine.kernels.gemv import _store_rows  # the last step, shared with the bf16 kernel

    # rows x words (8 weights a word) per program and step, warps, pipelined stages: bytes in flight
    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=warps, num_stages=s)
                for n, w, warps, s in ((8, 128, 4, 1), (16, 64, 4, 1), (4, 256, 4, 1), (8, 128, 4, 3),
                                       (4, 128, 4, 4), (2, 256, 4, 3), (16, 128, 8, 2), (8, 256, 8, 2),
                                       (32, 64, 8, 2), (1, 512, 4, 3), (2, 128, 2, 4), (4, 64, 2, 4))]
    if INTERPRETED:  # the interpreter is slow: one small configuration
        _CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_W": 8}, num_warps=4)]

    _MAGIC = tl.constexpr(0x4B000000)  # the float32 bits of 2**23: OR-ing bits 0..22 in gives 2**23 + those bits
    _TWO23 = tl.constexpr(8388608.0)

    @triton.jit
    def _code_times_x(src, x, SHIFT: tl.constexpr):
        """The 4-bit codes at bits SHIFT..SHIFT+3 of each word of `src` times x ([BLOCK_W], float32), as floats:
        the masked bits OR-ed into the mantissa of 2**23 give 2**23 + code * 2**SHIFT exactly (SHIFT <= 16), and
        x is scaled by 2**-SHIFT instead of shifting every word (one AND-OR per weight, no shift)."""
        value = ((src & (15 << SHIFT)) | _MAGIC).to(tl.float32, bitcast=True) - _TWO23
        return value * (x * (1.0 / (1 << SHIFT)))[None, :]

    @triton.autotune(configs=_CONFIGS, key=["N", "WORDS", "GROUP", "PARTS"], **AUTOTUNE_CACHE)
    @triton.jit
    def _int4_gemv_kernel(x_ptr, w_ptr, scale_ptr, low_ptr, out_ptr, N, WORDS, stride_wn, stride_sn, UP,
                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PARTS: tl.constexpr):
        """out[n] = sum_k (q[n, k] * scale[n, k // GROUP] + low[n, k // GROUP]) * x[k], reading the codes as int32
        words of 8 (code j of word w is column 8 w + j); PARTS=2: SiLU(gate) * up of gate rows and up rows (from
        row UP), as gemv._gemv_kernel. GROUP >= 8, so a word never spans two groups."""
        r = tl.arange(0, BLOCK_N * PARTS)
        units = tl.program_id(0) * BLOCK_N + r // PARTS
        rows = units + (r % PARTS) * UP  # PARTS=2: tile rows 2i and 2i + 1 are output i's gate and up rows
        row_ok = units < N
        # partial sums stay per lane through the loop and are reduced across the threads once, at the end
        acc = tl.zeros((BLOCK_N * PARTS, BLOCK_W), dtype=tl.float32)
        for w0 in range(0, WORDS, BLOCK_W):
            words = w0 + tl.arange(0, BLOCK_W)
            word_ok = words < WORDS
            ok = row_ok[:, None] & word_ok[None, :]
            packed = tl.load(w_ptr + rows[:, None] * stride_wn + words[None, :], mask=ok, other=0)
            groups = (words * 8) // GROUP
            scale = tl.load(scale_ptr + rows[:, None] * stride_sn + groups[None, :], mask=ok, other=0.0)
            low = tl.load(low_ptr + rows[:, None] * stride_sn + groups[None, :], mask=ok, other=0.0)
            high = packed >> 12  # codes 5, 6, 7 (bits 20..31) moved to bits 8..19
            part = tl.zeros((BLOCK_N * PARTS, BLOCK_W), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_W,), dtype=tl.float32)
            for j in tl.static_range(8):
                x = tl.load(x_ptr + words * 8 + j, mask=word_ok, other=0.0).to(tl.float32)
                xsum += x
                if j < 5:
                    part += _code_times_x(packed, x, 4 * j)
                else:
                    part += _code_times_x(high, x, 4 * (j - 3))
            acc += part * scale.to(tl.float32) + low.to(tl.float32) * xsum[None, :]
        _store_rows(out_ptr, tl.sum(acc, axis=1), N, BLOCK_N, PARTS)


def fits(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this packed weight ([N, K / 2] uint8): rows of whole, aligned 4-byte words."""
    return weight.stride(-1) == 1 and weight.shape[-1] % 4 == 0 and weight.stride(0) % 4 == 0


@kernel_op("mistral_chat::int4_linear")
def int4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                swiglu: bool = False) -> torch.Tensor:
    """x ([..., K], one row in all) times the int4 weight (packed [N, K / 2] uint8, with scale and low [N, groups])
    transposed; with `swiglu`, weight holds gate rows then up rows and the result is SiLU(gate) * up ([..., N / 2])."""
    assert triton is not None, "int4_linear needs Triton"
    k, parts = x.shape[-1], 2 if swiglu else 1
    n = weight.shape[0] // parts
    x_row = x.reshape(k).contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    if weight.storage_offset() % 4:  # a view that starts mid-word (loaded weights never do)
        weight = weight.clone()
    scale, low = scale.contiguous(), low.contiguous()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _int4_gemv_kernel[grid](x_row, weight.view(torch.int32), scale, low, out, n, k // 8, weight.stride(0) // 4,
                            scale.stride(0), n, GROUP=k // scale.shape[-1], PARTS=parts)
    return out.reshape(*x.shape[:-1], n)


@int4_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
      swiglu: bool = False) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // (2 if swiglu else 1))
