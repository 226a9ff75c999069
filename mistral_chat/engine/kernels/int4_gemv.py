"""Group-wise int4 weight-only matrix-vector product for batch-1 decode, as one Triton kernel.

The weight ([N, K] as [N, K / 2] bytes, two 4-bit codes a byte, the even column in the low nibble; see
engine/int4.py, whose format it reads as it is) is read once, as 128-bit quads of four 32-bit words (32 codes, all
in one group). The product, sum_k (q[n, k] * scale[n, g] + low[n, g]) * x[k] over groups g of GROUP columns, is
computed per group as scale * sum((q - 8) * x) + (low + 8 * scale) * sum(x): a quarter of bf16's bytes per token,
plus the groups' scales and lows.

On GPUs (HALF2) the codes become numbers two at a time, in packed half precision (inline PTX), as
FasterTransformer's and Marlin's int4 kernels do: `lop3` of a word with 0x000F000F (or 0x00F000F0) and 0x64006400
gives two fp16 numbers 1024 + q (or 1024 + 16 q) in one register, one `fma.rn.f16x2` turns them into (q - 8) / 32
exactly, and one more multiplies them by two activations and adds the products to a pair of fp16 sums. Code j of a
word pairs with code j + 4 (bits 4j and 4j + 16), so the activations are converted to fp16 pairs (x[8w+j],
x[8w+j+4]) once per quad and thread, for all of the thread's rows. That is 13 instructions for 8 codes (one shift,
four `lop3`, eight packed fp16 operations), where the float32 arithmetic of the kernel before took about three a
code; with loads, addresses, activations and scales, the main loop's SASS (ptxas of Triton 3.9, sm_90) has 16-20
instructions per 8 codes in the configurations of 8 and 16 rows a thread, against 58-69 before. A lane's fp16 sums
run over at most one group (16 products a quad, at most SPAN quads), then widen to float32, where the scale and low
apply and the long sum runs. With codes as (q - 8) / 32, a lane's sums stay within fp16's range (65504) for
activations below 4096 even where all of them add up (and the activations' fp16 sums, kept / 32, below 32768);
products under fp16's normal range (6e-5) lose relative precision, not their size. Run through a CPU model of these
instructions (tests/test_int4_gemv.py), the output's relative error is 0.5-1.2e-3 against the exact product of the
same int4 weights, float32 activations (bf16 rounding of the output: ~3e-3).

Under Triton's interpreter (TRITON_INTERPRET=1), which cannot run inline PTX, the same sums are computed in
float32. The tests check that path against the dequantized product, run the GPU path in the interpreter with each
inline PTX piece executed by a model of its instructions, and compile the GPU path for sm_90.

`int4_linear(x, weight, scale, low)` is a torch custom op (one opaque call for torch.compile and CUDA graphs);
`int4.Int4Linear` uses it for a single activation row where the plan's `int4` is "triton". `int4_experts` is the
same kernel over a Mixtral layer's stacked experts ([E, N, K / 2]), one program column per chosen expert, the
expert ids read on the GPU: moe.MoEFeedForward's one-token path for int4 experts (no dequantized copies).
Measurements: docs/engine.md.
"""

from __future__ import annotations

import torch

from mistral_chat.engine.kernels.fused import AUTOTUNE_CACHE, INTERPRETED, kernel_op, pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: the dequantized product is used
    triton = None

# packed fp16 arithmetic (inline PTX) on GPUs; under the interpreter, float32
HALF2 = not INTERPRETED
QUAD_CODES = 32  # codes a quad of words holds: every group size (128, 64, 32) is a multiple

# The inline PTX pieces, kept as strings so that tests can run them through a model of the instructions.
# The end of both activation pieces below: the four fp16 pairs p0..p3 out as $0..$3, and their sum / 32 as $4.
_PAIRS_AND_SUM = """\
    add.rn.f16x2 s0, p0, p1;
    add.rn.f16x2 s1, p2, p3;
    add.rn.f16x2 s0, s0, s1;
    mul.rn.f16x2 $4, s0, k;
    mov.b32 $0, p0;
    mov.b32 $1, p1;
    mov.b32 $2, p2;
    mov.b32 $3, p3;
}"""
# Eight activations x0..x7 ($5..$12, float32) as four fp16 pairs (x_j in the low half, x_j+4 in the high half: cvt
# puts its first operand in the high half), and the pairs' sum / 32 (0x2800: 1/32 in fp16).
X_PAIRS_ASM = """{
    .reg .b32 p0, p1, p2, p3, s0, s1, k;
    mov.b32 k, 0x28002800;
    cvt.rn.f16x2.f32 p0, $9, $5;
    cvt.rn.f16x2.f32 p1, $10, $6;
    cvt.rn.f16x2.f32 p2, $11, $7;
    cvt.rn.f16x2.f32 p3, $12, $8;
""" + _PAIRS_AND_SUM
# The same from eight bf16 activations as read, two a 32-bit word ($5..$8: x0 x1, x2 x3, x4 x5, x6 x7, the even
# one in the low half): a bf16 is the high half of its float32.
X_PAIRS_BF16_ASM = """{
    .reg .b32 f0, f1, f2, f3, f4, f5, f6, f7, p0, p1, p2, p3, s0, s1, k;
    mov.b32 k, 0x28002800;
    shl.b32 f0, $5, 16;
    and.b32 f1, $5, 0xFFFF0000;
    shl.b32 f2, $6, 16;
    and.b32 f3, $6, 0xFFFF0000;
    shl.b32 f4, $7, 16;
    and.b32 f5, $7, 0xFFFF0000;
    shl.b32 f6, $8, 16;
    and.b32 f7, $8, 0xFFFF0000;
    cvt.rn.f16x2.f32 p0, f4, f0;
    cvt.rn.f16x2.f32 p1, f5, f1;
    cvt.rn.f16x2.f32 p2, f6, f2;
    cvt.rn.f16x2.f32 p3, f7, f3;
""" + _PAIRS_AND_SUM
# Codes j and j + 4 of word $1 as (q - 8) / 32 in one fp16 pair (low half: code j), times the pair $2..$5 of
# activations (x_j, x_j+4), j = 0..3, added to the fp16 pair of sums $6. Codes at bits 0-3 (and 16-19) give
# 1024 + q: (q - 8) / 32 = fma(1024 + q, 1/32, -32.25); codes at bits 4-7 give 1024 + 16 q: (q - 8) / 32 =
# fma(1024 + 16 q, 1/512, -2.25); codes 2, 3, 6, 7 the same after a shift by 8. Each fma is exact. Constants as
# fp16 bits: 1/32 = 0x2800, -32.25 = 0xD008, 1/512 = 0x1800, -2.25 = 0xC080; 0xEA: lop3's table for (a & b) | c.
WORD_DOT_ASM = """{
    .reg .b32 t, h0, h1, h2, h3, m0, a0, m1, a1, s;
    mov.b32 m0, 0x28002800;
    mov.b32 a0, 0xD008D008;
    mov.b32 m1, 0x18001800;
    mov.b32 a1, 0xC080C080;
    shr.u32 t, $1, 8;
    lop3.b32 h0, $1, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 h1, $1, 0x00F000F0, 0x64006400, 0xEA;
    lop3.b32 h2, t, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 h3, t, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 h0, h0, m0, a0;
    fma.rn.f16x2 h1, h1, m1, a1;
    fma.rn.f16x2 h2, h2, m0, a0;
    fma.rn.f16x2 h3, h3, m1, a1;
    fma.rn.f16x2 s, h0, $2, $6;
    fma.rn.f16x2 s, h1, $3, s;
    fma.rn.f16x2 s, h2, $4, s;
    fma.rn.f16x2 $0, h3, $5, s;
}"""
# The two halves of an fp16 pair of sums, widened to float32 (low half $0, high half $1).
WIDEN_ASM = """{
    .reg .f16 lo, hi;
    mov.b32 {lo, hi}, $2;
    cvt.f32.f16 $0, lo;
    cvt.f32.f16 $1, hi;
}"""
HADD2_ASM = "add.rn.f16x2 $0, $1, $2;"


if triton is not None:
    from mistral_chat.engine.kernels.fused import start_next, wait_previous
    from mistral_chat.engine.kernels.gemv import _store_rows  # the last step, shared with the bf16 kernel

    _X_PAIRS, _X_PAIRS_BF16, _WORD_DOT, _WIDEN, _HADD2 = (
        tl.constexpr(a) for a in (X_PAIRS_ASM, X_PAIRS_BF16_ASM, WORD_DOT_ASM, WIDEN_ASM, HADD2_ASM))
    _QUAD = tl.constexpr(QUAD_CODES)

    # ROWS tile rows (BLOCK_N outputs x PARTS), BLOCK_Q lanes (32 a warp: every warp takes all the rows), SPAN
    # quads a lane takes from one group per step (the group's scale and low read once for them), warps. A thread
    # loads ROWS x SPAN 128-bit quads a step and converts each quad's activations once for its ROWS rows; a step
    # covers BLOCK_Q x SPAN quads (128 in a row of Mistral-7B's 4096 columns, 448 of its 14336). Loops of one or a
    # few steps: pipelining stages do not apply.
    _CONFIGS = [triton.Config({"ROWS": r, "BLOCK_Q": q, "SPAN": s}, num_warps=w, num_stages=1)
                for r, q, s, w in ((16, 128, 1, 4), (8, 128, 1, 4), (4, 128, 1, 4), (16, 64, 2, 2), (8, 64, 2, 2),
                                   (16, 32, 4, 1), (8, 32, 4, 1), (16, 64, 1, 2), (8, 32, 2, 1), (8, 128, 2, 4),
                                   (16, 32, 2, 1), (8, 64, 4, 2))]
    if INTERPRETED:  # the interpreter is slow: one small configuration
        _CONFIGS = [triton.Config({"ROWS": 16, "BLOCK_Q": 2, "SPAN": 2}, num_warps=4)]

    @triton.jit
    def _split4(t, A: tl.constexpr, B: tl.constexpr):
        """t[..., 0], t[..., 1], t[..., 2], t[..., 3] of t ([A, B, 4]; [B, 4] where A is 0), each thread's own."""
        if A == 0:
            u, v = tl.split(tl.reshape(t, (B, 2, 2)))
        else:
            u, v = tl.split(tl.reshape(t, (A, B, 2, 2)))
        t0, t2 = tl.split(u)
        t1, t3 = tl.split(v)
        return t0, t1, t2, t3

    @triton.jit
    def _hadd2(a, b):
        return tl.inline_asm_elementwise(_HADD2, "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _widen(h):
        """The low and high halves of h (fp16 pairs as int32), as float32."""
        return tl.inline_asm_elementwise(_WIDEN, "=f,=f,r", [h], dtype=(tl.float32, tl.float32), is_pure=True,
                                         pack=1)

    @triton.jit
    def _activations(x_ptr, quads, quad_ok, k: tl.constexpr, B: tl.constexpr, X_BF16: tl.constexpr):
        """The 8 activations of word k of each quad ([B]; 0 where not quad_ok): four int32 of bf16 pairs (X_BF16,
        one 16-byte load) or eight float32 (two loads of 4)."""
        if X_BF16:
            x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            at = (quads * (_QUAD // 2) + 4 * k)[:, None] + tl.arange(0, 4)[None, :]
            x = _split4(tl.load(x32 + at, mask=quad_ok[:, None], other=0), 0, B)
        else:  # 16 bytes of float32 a load: one thread's
            at = (quads * _QUAD + 8 * k)[:, None] + tl.arange(0, 4)[None, :]
            x0, x1, x2, x3 = _split4(tl.load(x_ptr + at, mask=quad_ok[:, None], other=0.0).to(tl.float32), 0, B)
            x4, x5, x6, x7 = _split4(tl.load(x_ptr + at + 4, mask=quad_ok[:, None], other=0.0).to(tl.float32), 0,
                                     B)
            x = (x0, x1, x2, x3, x4, x5, x6, x7)
        return x

    @triton.jit
    def _word_half2(word, x, part, xsum, X_BF16: tl.constexpr):
        """Add each word's 8 codes ([R, B] int32) times their activations x (`_activations`), (q - 8) / 32 * x in
        fp16 pairs, to part ([R, B] fp16 pairs as int32), and the activations / 32 to xsum ([B], the same way)."""
        if X_BF16:
            t0, t1, t2, t3 = x
            p0, p1, p2, p3, ps = tl.inline_asm_elementwise(
                _X_PAIRS_BF16, "=r,=r,=r,=r,=r,r,r,r,r", [t0, t1, t2, t3], dtype=(tl.int32,) * 5, is_pure=True,
                pack=1)
        else:
            x0, x1, x2, x3, x4, x5, x6, x7 = x
            p0, p1, p2, p3, ps = tl.inline_asm_elementwise(
                _X_PAIRS, "=r,=r,=r,=r,=r,f,f,f,f,f,f,f,f", [x0, x1, x2, x3, x4, x5, x6, x7],
                dtype=(tl.int32,) * 5, is_pure=True, pack=1)
        part = tl.inline_asm_elementwise(
            _WORD_DOT, "=r,r,r,r,r,r,r", [word, p0[None, :], p1[None, :], p2[None, :], p3[None, :], part],
            dtype=tl.int32, is_pure=True, pack=1)
        return part, _hadd2(xsum, ps)

    @triton.jit
    def _scales(scale_ptr, low_ptr, rows, first, QUADS, stride_sn, GROUP: tl.constexpr):
        """The scale and low ([R, B] float32) of each row's group holding quad first[i]."""
        groups = (tl.minimum(first, QUADS - 1) * _QUAD) // GROUP
        at = rows[:, None] * stride_sn + groups[None, :]
        return tl.load(scale_ptr + at).to(tl.float32), tl.load(low_ptr + at).to(tl.float32)

    @triton.jit
    def _load_quads(w_ptr, row_words, quads, ROWS: tl.constexpr, B: tl.constexpr):
        """Each row's quad quads[i] ([B]): [ROWS, B, 4] int32, one 128-bit load a row and lane."""
        words = quads[:, None] * 4 + tl.arange(0, 4)[None, :]
        return tl.load(w_ptr + row_words[:, None, None] + words[None, :, :])

    @triton.jit
    def _step(x_ptr, w_ptr, packed, scale, low, row_words, first, acc, QUADS, ROWS: tl.constexpr, B: tl.constexpr,
              S: tl.constexpr, HALF2: tl.constexpr, X_BF16: tl.constexpr):
        """acc ([ROWS, B] float32) plus the sums of quads first[i] .. first[i] + S - 1 of lane i, one group's, given
        `packed` (`_load_quads` of the first of them) and their group's scale and low (`_scales`). Each quad's
        loads are issued before its arithmetic."""
        if HALF2:
            part = tl.zeros((ROWS, B), dtype=tl.int32)
            xsum = tl.zeros((B,), dtype=tl.int32)
        else:
            part = tl.zeros((ROWS, B), dtype=tl.float32)
            xsum = tl.zeros((B,), dtype=tl.float32)
        for s in tl.static_range(S):
            quads = first + s
            quad_ok = quads < QUADS
            quads = tl.minimum(quads, QUADS - 1)
            if s > 0:
                packed = _load_quads(w_ptr, row_words, quads, ROWS, B)
            if HALF2:
                x0 = _activations(x_ptr, quads, quad_ok, 0, B, X_BF16)
                x1 = _activations(x_ptr, quads, quad_ok, 1, B, X_BF16)
                x2 = _activations(x_ptr, quads, quad_ok, 2, B, X_BF16)
                x3 = _activations(x_ptr, quads, quad_ok, 3, B, X_BF16)
                w0, w1, w2, w3 = _split4(packed, ROWS, B)
                part, xsum = _word_half2(w0, x0, part, xsum, X_BF16)
                part, xsum = _word_half2(w1, x1, part, xsum, X_BF16)
                part, xsum = _word_half2(w2, x2, part, xsum, X_BF16)
                part, xsum = _word_half2(w3, x3, part, xsum, X_BF16)
            else:  # the same sums in float32, all 32 codes of a quad at once (code j of word w: column 8 w + j)
                x = tl.load(x_ptr + quads[:, None] * _QUAD + tl.arange(0, _QUAD)[None, :], mask=quad_ok[:, None],
                            other=0.0).to(tl.float32)
                shifts = 4 * tl.arange(0, 8)
                codes = ((packed[:, :, :, None] >> shifts[None, None, None, :]) & 15).to(tl.float32)
                codes = tl.reshape(codes, (ROWS, B, _QUAD))
                part += tl.sum((codes - 8.0) * (1.0 / 32.0) * x[None, :, :], axis=2)
                xsum += tl.sum(x, axis=1) * (1.0 / 32.0)
        if HALF2:
            part_lo, part_hi = _widen(part)
            xsum_lo, xsum_hi = _widen(xsum)
            acc = tl.fma(part_lo, scale, acc)
            acc = tl.fma(part_hi, scale, acc)
            xsum = xsum_lo + xsum_hi
        else:
            acc = tl.fma(part, scale, acc)
        return tl.fma(tl.fma(scale, 8.0, low), xsum[None, :], acc)

    @triton.autotune(configs=_CONFIGS, key=["N", "QUADS", "GROUP", "PARTS", "HALF2", "X_BF16", "SLOTS"],
                     **AUTOTUNE_CACHE)
    @triton.jit
    def _int4_gemv_kernel(x_ptr, w_ptr, scale_ptr, low_ptr, out_ptr, experts_ptr, N, QUADS, stride_wn, stride_sn,
                          UP, stride_we, stride_se, stride_x, SLOTS, GROUP: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_Q: tl.constexpr, SPAN: tl.constexpr, PARTS: tl.constexpr, EXPERTS: tl.constexpr,
                          HALF2: tl.constexpr, X_BF16: tl.constexpr, PDL: tl.constexpr):
        """out[n] = sum_k (q[n, k] * scale[n, k // GROUP] + low[n, k // GROUP]) * x[k], reading the codes as int32
        quads (code j of word w is column 8 w + j; QUADS quads a row, stride_wn words apart); PARTS=2: SiLU(gate)
        * up of gate rows and up rows (from row UP), as gemv._gemv_kernel. EXPERTS: program (i, s) multiplies by
        expert experts[s] (its weights stride_we words, its scales and lows stride_se apart) the row x + s *
        stride_x, into out + s * N (the chosen experts of one token, read in place).

        Lane i of a step takes quads i * S .. i * S + S - 1 (S = SPAN where a group holds that many quads, else
        the group's), all in one group, for each of the program's ROWS rows. Rows past N and quads past QUADS read
        the last row or quad instead (their activations read as 0, their sums stored nowhere), so no weight load
        is masked. PDL (fused.pdl): the first weights are loaded while the previous kernel may still run (not with
        EXPERTS, whose expert ids come from the kernel before)."""
        start_next(PDL)
        if EXPERTS:
            wait_previous(PDL)
            slot = tl.program_id(1)
            expert = tl.load(experts_ptr + slot).to(tl.int64)
            w_ptr += expert * stride_we
            scale_ptr += expert * stride_se
            low_ptr += expert * stride_se
            x_ptr += slot * stride_x
            out_ptr += slot * N
        BLOCK_N: tl.constexpr = ROWS // PARTS
        G: tl.constexpr = GROUP // _QUAD  # quads a group
        S: tl.constexpr = SPAN - (SPAN - G) * (G < SPAN)  # SPAN, at most G (both powers of 2)
        r = tl.arange(0, ROWS)
        units = tl.program_id(0) * BLOCK_N + r // PARTS
        rows = tl.minimum(units, N - 1) + (r % PARTS) * UP  # PARTS=2: tile rows 2i, 2i + 1: output i's gate, up
        row_words = tl.multiple_of(rows * stride_wn, 4)  # rows of whole quads (int4_gemv.fits)
        lanes = tl.arange(0, BLOCK_Q)
        first = lanes * S  # the first step's weights, scales and lows: before the wait
        packed = _load_quads(w_ptr, row_words, tl.minimum(first, QUADS - 1), ROWS, BLOCK_Q)
        scale, low = _scales(scale_ptr, low_ptr, rows, first, QUADS, stride_sn, GROUP)
        if not EXPERTS:
            wait_previous(PDL)
        acc = _step(x_ptr, w_ptr, packed, scale, low, row_words, first, tl.zeros((ROWS, BLOCK_Q), dtype=tl.float32),
                    QUADS, ROWS, BLOCK_Q, S, HALF2, X_BF16)
        for q0 in range(BLOCK_Q * S, QUADS, BLOCK_Q * S):
            first = q0 + lanes * S
            packed = _load_quads(w_ptr, row_words, tl.minimum(first, QUADS - 1), ROWS, BLOCK_Q)
            scale, low = _scales(scale_ptr, low_ptr, rows, first, QUADS, stride_sn, GROUP)
            acc = _step(x_ptr, w_ptr, packed, scale, low, row_words, first, acc, QUADS, ROWS, BLOCK_Q, S, HALF2,
                        X_BF16)
        _store_rows(out_ptr, tl.sum(acc, axis=1) * 32.0, tl.program_id(0) * BLOCK_N, N, BLOCK_N, PARTS)


def fits(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this packed weight ([..., N, K / 2] uint8): rows of whole, 16-byte aligned quads (K
    a multiple of 32, which every int4 group size is)."""
    return weight.stride(-1) == 1 and weight.shape[-1] % 16 == 0 and weight.stride(-2) % 16 == 0


@kernel_op("mistral_chat::int4_linear")
def int4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                swiglu: bool = False) -> torch.Tensor:
    """x ([..., K], one row in all) times the int4 weight (packed [N, K / 2] uint8, with scale and low [N, groups])
    transposed; with `swiglu`, weight holds gate rows then up rows and the result is SiLU(gate) * up ([..., N / 2])."""
    assert triton is not None, "int4_linear needs Triton"
    k, parts = x.shape[-1], 2 if swiglu else 1
    n = weight.shape[0] // parts
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    launch(x.reshape(k).contiguous(), weight, scale.contiguous(), low.contiguous(), out, parts, HALF2 and x.is_cuda)
    return out.reshape(*x.shape[:-1], n)


@kernel_op("mistral_chat::int4_experts")
def int4_experts(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                 experts: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
    """The chosen experts' products for one token, each expert's weight read in place: x ([K], or [slots, K]: one
    row per slot) times weight[experts[s]] (packed [E, N, K / 2] uint8, scale and low [E, N, groups]) transposed,
    for each slot s of experts ([slots] expert ids, on the device); with `swiglu`, SiLU(gate) * up of each
    expert's gate and up rows. Returns [slots, N] ([slots, N / 2] with swiglu)."""
    assert triton is not None, "int4_experts needs Triton"
    slots, k, parts = experts.numel(), x.shape[-1], 2 if swiglu else 1
    n = weight.shape[1] // parts
    out = torch.empty(slots, n, dtype=x.dtype, device=x.device)
    x = x.reshape(-1, k).contiguous()
    launch(x, weight, scale.contiguous(), low.contiguous(), out, parts, HALF2 and x.is_cuda,
           experts=experts.reshape(slots).contiguous())
    return out


def launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, out: torch.Tensor,
           parts: int, half2: bool, experts: torch.Tensor | None = None, **config) -> None:
    """Run the kernel for x ([K], or [slots, K] with `experts`) into out ([N], or [slots, N] with `experts`),
    packed fp16 arithmetic (inline PTX) where `half2`; `config` (ROWS, BLOCK_Q, SPAN, num_warps, num_stages):
    that configuration instead of the autotuned one (benchmarks)."""
    n, k = out.shape[-1], x.shape[-1]
    if weight.data_ptr() % 16:  # a view that starts mid-quad (loaded weights never do)
        weight = weight.clone()
    if x.data_ptr() % 16:  # bf16 activations are read as 32-bit words
        x = x.clone()
    slots = 1 if experts is None else experts.numel()
    stride_x = k if x.dim() == 2 and x.shape[0] > 1 else 0

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["ROWS"] // parts), slots)

    stacked = experts is not None
    args = (x, weight.view(torch.int32), scale, low, out, x if experts is None else experts, n, k // QUAD_CODES,
            weight.stride(-2) // 4, scale.stride(-2), n, weight.stride(0) // 4 if stacked else 0,
            scale.stride(0) if stacked else 0, stride_x, slots)
    options = dict(GROUP=k // scale.shape[-1], PARTS=parts, EXPERTS=stacked, HALF2=half2,
                   X_BF16=x.dtype == torch.bfloat16, **pdl(x))
    if config:
        _int4_gemv_kernel.fn[grid(config)](*args, **options, **config)
    else:
        _int4_gemv_kernel[grid](*args, **options)


@int4_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
      swiglu: bool = False) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // (2 if swiglu else 1))


@int4_experts.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, experts: torch.Tensor,
      swiglu: bool = False) -> torch.Tensor:
    return x.new_empty(experts.numel(), weight.shape[1] // (2 if swiglu else 1))
