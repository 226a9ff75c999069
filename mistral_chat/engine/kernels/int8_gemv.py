"""int8 weight-only matrix-vector product for batch-1 decode, as one Triton kernel.

Decode multiplies one activation row by every weight matrix, so its speed is how fast the weights stream from
memory. `F.linear(x, w_int8.to(bf16)) * scale` may write the dequantized weight out and read it back (more
traffic than bf16 alone); this kernel reads each int8 weight once, four to a 32-bit word, turns each byte into a
float with bit operations, and applies the per-row scale to the sum: half the bytes of bf16 per token.

`int8_linear(x, weight, scale)` is a torch custom op (so torch.compile and CUDA graphs treat it as one opaque
call); `Int8Linear` uses it for a single activation row where the plan's `int8` is "triton", and the plain product
otherwise. On GPUs the bytes become floats through byte permutes (BYTE_PERMUTE, inline PTX); the tests run the
portable bit operations on the CPU through Triton's interpreter (TRITON_INTERPRET=1) and compile the GPU path for
sm_90. Measurements: docs/engine.md.
"""

from __future__ import annotations

import torch

from mistral_chat.engine.kernels.fused import AUTOTUNE_CACHE, INTERPRETED, kernel_op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: the plain product is used
    triton = None

# the PRMT path (inline PTX) on GPUs; under the interpreter, the portable bit operations
BYTE_PERMUTE = not INTERPRETED


if triton is not None:
    from mistral_chat.engine.kernels.gemv import _store_rows  # the last step, shared with the bf16 kernel

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
    _TOP = tl.constexpr(-65536)  # 0xFFFF0000 as int32
    _FLIP = tl.constexpr(-2139062144)  # 0x80808080 as int32: flips each byte's sign bit, s -> s + 128

    @triton.autotune(configs=_CONFIGS, key=["N", "WORDS", "BYTE_PERMUTE", "PARTS"], **AUTOTUNE_CACHE)
    @triton.jit
    def _int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, WORDS, stride_wn, UP,
                          BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BYTE_PERMUTE: tl.constexpr,
                          PARTS: tl.constexpr):
        """out[n] = scale[n] * sum_k w[n, k] * x[k], reading w ([N, 4 * WORDS] int8) as int32 words of 4 weights;
        PARTS=2: SiLU(gate) * up of gate rows and up rows (from row UP), as gemv._gemv_kernel.

        Each byte becomes a float by bit operations (its value + 128 placed in the mantissa of 2**23, then one
        subtraction) instead of an int-to-float conversion instruction, which GPUs issue at a fraction of the
        rate of float arithmetic and which, at one per weight, held the product below the memory's speed.
        BYTE_PERMUTE (GPUs): one XOR per word, then one PRMT (byte permute) per weight builds those bits, where
        the portable path takes a shift, an AND, an XOR and an OR (integer instructions run at half the rate of
        float ones on Hopper, and at four per weight they, not memory, bounded the smaller matrices)."""
        r = tl.arange(0, BLOCK_N * PARTS)
        units = tl.program_id(0) * BLOCK_N + r // PARTS
        rows = units + (r % PARTS) * UP  # PARTS=2: tile rows 2i and 2i + 1 are output i's gate and up rows
        row_ok = units < N
        # partial sums stay per lane through the loop and are reduced across the threads once, at the end (a
        # reduction in every step of the loop stalls the loads behind shuffles)
        acc = tl.zeros((BLOCK_N * PARTS, BLOCK_W), dtype=tl.float32)
        for w0 in range(0, WORDS, BLOCK_W):
            words = w0 + tl.arange(0, BLOCK_W)
            word_ok = words < WORDS
            packed = tl.load(w_ptr + rows[:, None] * stride_wn + words[None, :],
                             mask=row_ok[:, None] & word_ok[None, :], other=0)
            if BYTE_PERMUTE:  # one PRMT instruction per weight puts byte b under the exponent of 2**23
                biased = tl.inline_asm_elementwise(
                    asm="""{
                    .reg .b32 m;
                    mov.b32 m, 0x4B000000;
                    prmt.b32 $0, $4, m, 0x7540;
                    prmt.b32 $1, $4, m, 0x7541;
                    prmt.b32 $2, $4, m, 0x7542;
                    prmt.b32 $3, $4, m, 0x7543;
                    }""",
                    constraints="=r,=r,=r,=r,r", args=[packed ^ _FLIP], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
                # x's 4 bf16 of word j as one 64-bit load laid out like the weights (no shuffle through shared
                # memory); each bf16 is the top half of its float32
                quad = tl.load(x_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + words[None, :] + rows[:, None] * 0,
                               mask=word_ok[None, :], other=0)
                low, high = quad.to(tl.int32), (quad >> 32).to(tl.int32)
                xs = (low << 16, low & _TOP, high << 16, high & _TOP)
                for b in tl.static_range(4):
                    acc += ((biased[b].to(tl.float32, bitcast=True) - _OFFSET)
                            * xs[b].to(tl.float32, bitcast=True))
            else:
                for b in tl.static_range(4):  # byte b of word j is weight 4 j + b (little-endian)
                    x = tl.load(x_ptr + words * 4 + b, mask=word_ok, other=0.0).to(tl.float32)
                    biased = ((packed >> (8 * b)) & 0xFF) ^ 0x80  # the signed byte s as s + 128, in 0..255
                    weight = (biased | _MAGIC).to(tl.float32, bitcast=True) - _OFFSET
                    acc += weight * x[None, :]
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        _store_rows(out_ptr, tl.sum(acc, axis=1) * scale, tl.program_id(0) * BLOCK_N, N, BLOCK_N, PARTS)


def fits(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this int8 weight ([N, K]): rows of whole, aligned 4-byte words."""
    return weight.stride(-1) == 1 and weight.shape[-1] % 4 == 0 and weight.stride(0) % 4 == 0


@kernel_op("mistral_chat::int8_linear")
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
    """x ([..., K], one row in all) times weight ([N, K] int8) transposed, each output scaled by scale ([N]); with
    `swiglu`, weight holds gate rows then up rows and the result is SiLU(gate) * up ([..., N / 2])."""
    assert triton is not None, "int8_linear needs Triton"
    k, parts = x.shape[-1], 2 if swiglu else 1
    n = weight.shape[0] // parts
    x_row = x.reshape(k).contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    if weight.storage_offset() % 4:  # a view that starts mid-word (loaded weights never do)
        weight = weight.clone()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _int8_gemv_kernel[grid](x_row, weight.view(torch.int32), scale, out, n, k // 4, weight.stride(0) // 4, n,
                            PARTS=parts, BYTE_PERMUTE=BYTE_PERMUTE and x.is_cuda and x.dtype == torch.bfloat16)
    return out.reshape(*x.shape[:-1], n)


@int8_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // (2 if swiglu else 1))
