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

from mistral_chat.engine.kernels.fused import (AUTOTUNE_CACHE, INTERPRETED, column_split, kernel_op, multiprocessors,
                                              pdl)
from mistral_chat.engine.kernels.int4_ptx import (HADD2_ASM, PREFETCH_ASM, WIDEN_ASM, WORD_DOT_ASM, X_PAIRS_ASM,
                                                  X_PAIRS_BF16_ASM)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: the dequantized product is used
    triton = None

# packed fp16 arithmetic (inline PTX) on GPUs; under the interpreter, float32
HALF2 = not INTERPRETED
QUAD_CODES = 32  # codes a quad of words holds: every group size (128, 64, 32) is a multiple
TILE_ROWS = 32  # rows of a block in the tiled layout (int4.tile): one a lane


if triton is not None:
    from mistral_chat.engine.kernels.fused import start_next, wait_previous
    from mistral_chat.engine.kernels.gemv import _store_rows  # the last step, shared with the bf16 kernel

    _X_PAIRS, _X_PAIRS_BF16, _WORD_DOT, _WIDEN, _HADD2, _PREFETCH = (
        tl.constexpr(a) for a in (X_PAIRS_ASM, X_PAIRS_BF16_ASM, WORD_DOT_ASM, WIDEN_ASM, HADD2_ASM, PREFETCH_ASM))
    _QUAD = tl.constexpr(QUAD_CODES)

    # Configurations: U quad blocks (4 quads of each of a thread's 4 rows) a warp takes a step, and WARPS warps
    # (num_warps), each warp other quad blocks of the same 32 rows.
    _CONFIGS = [triton.Config({"U": u, "WARPS": w}, num_warps=w, num_stages=1)
                for u, w in ((1, 4), (2, 4), (4, 4), (1, 8), (2, 8), (4, 8), (1, 16), (2, 16), (8, 4))]
    if INTERPRETED:  # the interpreter is slow: one small configuration
        _CONFIGS = [triton.Config({"U": 1, "WARPS": 1}, num_warps=1)]

    @triton.jit
    def _split4(t):
        """t[..., 0], t[..., 1], t[..., 2], t[..., 3] of t ([A, B, 4]), each thread's own."""
        A: tl.constexpr = t.shape[0]
        B: tl.constexpr = t.shape[1]
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
    def _prefetch(w_ptr, block, first, QUADS, U: tl.constexpr, WARPS: tl.constexpr, HALF2: tl.constexpr):
        """Ask L2 for the block's weights of the first step (on GPUs), while the previous kernel may still run:
        WARPS * U quad blocks from quad block `first`, 2 KB each, contiguous."""
        if HALF2:
            lines = tl.minimum(first * 512 + tl.arange(0, WARPS * U * 16) * 32, QUADS * 128 - 32)  # 128-byte lines
            at = w_ptr + block.to(tl.int64) * QUADS * 128 + lines
            tl.inline_asm_elementwise(_PREFETCH, "=r,l", [at], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _bf16_pair(t):
        """The two bf16 of each int32 of t (the even one in the low half), as float32."""
        return (t << 16).to(tl.float32, bitcast=True), (t & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _x_offsets(qb, k: tl.constexpr, PER_WORD: tl.constexpr):
        """[WARPS, 128] offsets of 4 activation words a lane (a warp's 128-bit loads): lane i's quad qb * 4 + i // 8,
        its word k (PER_WORD elements a word: 8 bf16 as 4 int32, or 8 float32 as two loads of 4)."""
        col = tl.arange(0, 128)[None, :]
        return (qb[:, None] * 4 + col // 32) * (4 * PER_WORD) + k * PER_WORD + col % 4

    @triton.jit
    def _bf16_words(x_ptr, qb, ok, k: tl.constexpr):
        """The 8 bf16 activations of word k of each lane's quad (`_x_offsets`; 0 where not ok, [WARPS, 1]) as
        read: four int32 of bf16 pairs, each [WARPS, 32] (one 16-byte load; 8 lanes of a quad read the same)."""
        at = _x_offsets(qb, k, 4)
        t = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + at, mask=ok & (at >= 0), other=0)
        return _split4(tl.reshape(t, (t.shape[0], 32, 4)))

    @triton.jit
    def _f32_words(x_ptr, qb, ok, k: tl.constexpr):
        """The 8 float32 activations of word k of each lane's quad (`_x_offsets`; two loads), each [WARPS, 32]."""
        at = _x_offsets(qb, k, 8)
        lo = tl.load(x_ptr + at, mask=ok & (at >= 0), other=0.0).to(tl.float32)
        hi = tl.load(x_ptr + at + 4, mask=ok & (at >= 0), other=0.0).to(tl.float32)
        x0, x1, x2, x3 = _split4(tl.reshape(lo, (lo.shape[0], 32, 4)))
        x4, x5, x6, x7 = _split4(tl.reshape(hi, (hi.shape[0], 32, 4)))
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _x_word(x_ptr, qb, ok, k: tl.constexpr, X_BF16: tl.constexpr):
        """Word k's activations as the packed products take them (HALF2): four fp16 pairs (x_j, x_j+4) and their
        sum / 32 (fp16 pairs as int32)."""
        if X_BF16:
            t = _bf16_words(x_ptr, qb, ok, k)
            pairs = tl.inline_asm_elementwise(_X_PAIRS_BF16, "=r,=r,=r,=r,=r,r,r,r,r", [t[0], t[1], t[2], t[3]],
                                              dtype=(tl.int32,) * 5, is_pure=True, pack=1)
        else:
            x = _f32_words(x_ptr, qb, ok, k)
            pairs = tl.inline_asm_elementwise(_X_PAIRS, "=r,=r,=r,=r,=r,f,f,f,f,f,f,f,f",
                                              [x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]],
                                              dtype=(tl.int32,) * 5, is_pure=True, pack=1)
        return pairs

    @triton.jit
    def _x_quad(x_ptr, qb, ok, X_BF16: tl.constexpr):
        """The float32 path (the interpreter): each lane's 32 activations (its quad, `_x_offsets`) as
        [WARPS, 32, 4, 8] (word, code), and their sum / 32 ([WARPS, 32]); a few large operations, not many small
        ones, as the interpreter runs each operation at a fixed cost."""
        lanes = tl.arange(0, 32)[None, :, None]
        if X_BF16:  # bf16 pairs as int32, made float32 by bit operations
            at = (qb[:, None, None] * 4 + lanes // 8) * 16 + tl.arange(0, 16)[None, None, :]
            t = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + at, mask=ok[:, :, None], other=0)
            lo, hi = _bf16_pair(t)
            x = tl.reshape(tl.join(lo, hi), (t.shape[0], 32, 32))
        else:
            at = (qb[:, None, None] * 4 + lanes // 8) * 32 + tl.arange(0, 32)[None, None, :]
            x = tl.load(x_ptr + at, mask=ok[:, :, None], other=0.0).to(tl.float32)
        return tl.reshape(x, (x.shape[0], 32, 4, 8)), tl.sum(x, axis=2) * (1.0 / 32.0)

    @triton.jit
    def _word_dot(word, x, part):
        """part plus the word's 8 codes (q - 8) / 32 times their activations (`_x_word`), in fp16 pairs (part too,
        as int32)."""
        return tl.inline_asm_elementwise(_WORD_DOT, "=r,r,r,r,r,r,r", [word, x[0], x[1], x[2], x[3], part],
                                         dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _quad_dot(w_ptr, at, x0, x1, x2, x3, HALF2: tl.constexpr):
        """One row's quad (the [WARPS, 128] words at w_ptr + at: 4 of each lane) times its activations (HALF2:
        `_x_word` of words 0-3), fp16 pairs as int32; else (x0: `_x_quad`'s [WARPS, 32, 4, 8]) float32, [WARPS, 32]."""
        words = tl.load(w_ptr + at)
        if HALF2:
            w0, w1, w2, w3 = _split4(tl.reshape(words, (words.shape[0], 32, 4)))
            part = _word_dot(w0, x0, tl.zeros(w0.shape, dtype=tl.int32))
            part = _word_dot(w1, x1, part)
            part = _word_dot(w2, x2, part)
            part = _word_dot(w3, x3, part)
        else:
            shifts = (tl.arange(0, 8) * 4)[None, None, None, :]
            codes = (tl.reshape(words, (words.shape[0], 32, 4))[:, :, :, None] >> shifts) & 15
            part = tl.sum(tl.sum((codes.to(tl.float32) - 8.0) * x0, axis=3), axis=2) * (1.0 / 32.0)
        return part

    @triton.jit
    def _apply(acc, part, xsum, scale_ptr, low_ptr, at, HALF2: tl.constexpr):
        """acc plus one group's sums: scale * part + (low + 8 scale) * xsum, the scale and low at `at`."""
        scale = tl.load(scale_ptr + at).to(tl.float32)
        low = tl.load(low_ptr + at).to(tl.float32)
        if HALF2:
            part_lo, part_hi = _widen(part)
            acc = tl.fma(part_lo + part_hi, scale, acc)
        else:
            acc = tl.fma(part, scale, acc)
        return tl.fma(tl.fma(scale, 8.0, low), xsum, acc)

    @triton.jit
    def _row_step(w_ptr, scale_ptr, low_ptr, at_w, at_s, x0, x1, x2, x3, xsum, acc, HALF2: tl.constexpr):
        """acc ([WARPS, 32]) plus one tile row's quads (the words at w_ptr + at_w) times their activations (`_x_word`
        of words 0-3; xsum: their sum / 32, float32), scaled by the group's scale and low at at_s."""
        return _apply(acc, _quad_dot(w_ptr, at_w, x0, x1, x2, x3, HALF2), xsum, scale_ptr, low_ptr, at_s, HALF2)

    @triton.jit
    def _block_step(w_ptr, scale_ptr, low_ptr, blk, qb, QB, GROUPS, x0, x1, x2, x3, xsum, a0, a1, a2, a3,
                    GROUP: tl.constexpr, HALF2: tl.constexpr):
        """Block blk's 4 tile rows' accumulators plus quad block qb ([WARPS]) of each: a warp's lane i takes row
        r * 8 + i % 8 (accumulator a_r) and quad qb * 4 + i // 8 of each row."""
        lanes = tl.arange(0, 32)[None, :]
        at_w = ((blk * QB + qb) * 512)[:, None] + tl.arange(0, 128)[None, :]  # [WARPS, 128]: 4 words a lane
        if GROUP >= 4 * _QUAD:  # one group for the whole quad block
            groups = qb[:, None] * (4 * _QUAD) // GROUP + lanes * 0
        else:
            groups = (qb[:, None] * 4 + lanes // 8) * _QUAD // GROUP
        at_s = (blk * GROUPS + groups) * 32 + lanes % 8
        a0 = _row_step(w_ptr, scale_ptr, low_ptr, at_w, at_s, x0, x1, x2, x3, xsum, a0, HALF2)
        a1 = _row_step(w_ptr, scale_ptr, low_ptr, at_w + 128, at_s + 8, x0, x1, x2, x3, xsum, a1, HALF2)
        a2 = _row_step(w_ptr, scale_ptr, low_ptr, at_w + 256, at_s + 16, x0, x1, x2, x3, xsum, a2, HALF2)
        a3 = _row_step(w_ptr, scale_ptr, low_ptr, at_w + 384, at_s + 24, x0, x1, x2, x3, xsum, a3, HALF2)
        return a0, a1, a2, a3

    @triton.jit
    def _row_sums(acc):
        """One tile row's 8 sums (acc: [WARPS, 32] accumulators, lane i: output i % 8)."""
        return tl.sum(tl.reshape(tl.sum(acc, axis=0), (4, 8)), axis=0) * 32.0

    @triton.jit
    def _store_sums(out_ptr, g, u, first, N, PARTS: tl.constexpr):
        """Store one tile row's 8 outputs from its sums (gate g, up u)."""
        if PARTS == 2:
            sums = tl.reshape(tl.join(g, u), (16,))
        else:
            sums = g
        _store_rows(out_ptr, sums, first, N, 8, PARTS)

    @triton.jit
    def _store_tile_row(out_ptr, gate, up, first, N, PARTS: tl.constexpr):
        """Store one tile row's 8 outputs (gate, up: [WARPS, 32] accumulators, lane i: output i % 8)."""
        if PARTS == 2:
            _store_sums(out_ptr, _row_sums(gate), _row_sums(up), first, N, PARTS)
        else:
            _store_sums(out_ptr, _row_sums(gate), None, first, N, PARTS)

    @triton.jit
    def _put_partial(partial_ptr, gate, up, r: tl.constexpr, PARTS: tl.constexpr):
        """Tile row r's float32 sums of this program's columns into its 64-float partial at partial_ptr."""
        eight = tl.arange(0, 8)
        tl.store(partial_ptr + r * 16 + eight, _row_sums(gate))
        if PARTS == 2:
            tl.store(partial_ptr + r * 16 + 8 + eight, _row_sums(up))

    @triton.jit
    def _partial_sum(partial_ptr, at: tl.constexpr, SPLIT: tl.constexpr):
        """The sum over the SPLIT partials at partial_ptr (64 floats apart) of 8 floats from offset `at` (read from
        L2: other programs wrote them)."""
        rows = tl.arange(0, SPLIT)[:, None] * 64 + at + tl.arange(0, 8)[None, :]
        return tl.sum(tl.load(partial_ptr + rows, cache_modifier=".cg"), axis=0)

    @triton.jit
    def _finish_split(out_ptr, partial_ptr, count_ptr, a0, a1, a2, a3, u0, u1, u2, u3, first, N,
                      SPLIT: tl.constexpr, PARTS: tl.constexpr):
        """The end of one of a block's SPLIT programs (each took a share of the columns): its partial sums to
        partial_ptr (the block's SPLIT partials of 64 floats), then one count at count_ptr; the program that counts
        last adds the partials up, stores the outputs and sets the count back to 0 for the next launch."""
        part = partial_ptr + tl.program_id(2) * 64
        _put_partial(part, a0, u0, 0, PARTS)
        _put_partial(part, a1, u1, 1, PARTS)
        _put_partial(part, a2, u2, 2, PARTS)
        _put_partial(part, a3, u3, 3, PARTS)
        tl.debug_barrier()  # every thread's partial is written before the count releases them
        if tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            for r in tl.static_range(4):
                g = _partial_sum(partial_ptr, r * 16, SPLIT)
                if PARTS == 2:
                    _store_sums(out_ptr, g, _partial_sum(partial_ptr, r * 16 + 8, SPLIT), first + r * 8, N, PARTS)
                else:
                    _store_sums(out_ptr, g, None, first + r * 8, N, PARTS)
            tl.store(count_ptr, 0)

    @triton.autotune(configs=_CONFIGS, key=["N", "QUADS", "GROUP", "SPLIT", "PARTS", "HALF2", "X_BF16", "SLOTS"],
                     **AUTOTUNE_CACHE)
    @triton.jit
    def _int4_gemv_kernel(x_ptr, w_ptr, scale_ptr, low_ptr, out_ptr, experts_ptr, partial_ptr, count_ptr, N, QUADS,
                          GROUPS, UP, stride_we, stride_se, stride_x, SLOTS, GROUP: tl.constexpr, U: tl.constexpr,
                          WARPS: tl.constexpr, SPLIT: tl.constexpr, PARTS: tl.constexpr, EXPERTS: tl.constexpr,
                          HALF2: tl.constexpr, X_BF16: tl.constexpr, PDL: tl.constexpr):
        """out[n] = sum_k (q[n, k] * scale[n, k // GROUP] + low[n, k // GROUP]) * x[k] for the 32 rows of block
        program_id(0), the weight in int4.tile's layout: lane i of a warp takes rows r * 8 + i % 8 (r = 0..3) and
        quad qb * 4 + i // 8 of each, so a warp loads 512 contiguous bytes a row r and quad block qb, and the
        activations of 4 quads (lanes of a quad read the same 16 bytes) once for its 4 rows. Warp w takes quad
        blocks w * U .. w * U + U - 1 of each step. PARTS=2: SiLU(gate) * up of gate block b and up block b + UP /
        32. EXPERTS: program (i, s) multiplies by expert experts[s] (its weights stride_we words, its scales and lows
        stride_se apart) the row x + s * stride_x, into out + s * N (the chosen experts of one token, read in
        place). PDL (fused.pdl): the first step's weights are asked of L2 while the previous kernel may still run
        (not with EXPERTS, whose ids come from the kernel before). SPLIT > 1: program (i, s, j) takes the j-th of
        SPLIT shares of the quad blocks, and `_finish_split` adds the shares up (more programs where a matrix has
        few blocks of rows)."""
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
        block = tl.program_id(0).to(tl.int64)
        up_block = block + UP // 32
        QB = QUADS // 4
        share = tl.cdiv(tl.cdiv(QB, SPLIT), WARPS * U) * (WARPS * U)  # quad blocks a program takes: whole steps
        begin = tl.program_id(2) * share
        end = tl.minimum(begin + share, QB)
        if not EXPERTS:
            if PDL:
                _prefetch(w_ptr, block, begin, QUADS, U, WARPS, HALF2)
                if PARTS == 2:
                    _prefetch(w_ptr, up_block, begin, QUADS, U, WARPS, HALF2)
            wait_previous(PDL)
        a0 = tl.zeros((WARPS, 32), dtype=tl.float32)
        a1 = tl.zeros((WARPS, 32), dtype=tl.float32)
        a2 = tl.zeros((WARPS, 32), dtype=tl.float32)
        a3 = tl.zeros((WARPS, 32), dtype=tl.float32)
        u0 = tl.zeros((WARPS, 32), dtype=tl.float32)
        u1 = tl.zeros((WARPS, 32), dtype=tl.float32)
        u2 = tl.zeros((WARPS, 32), dtype=tl.float32)
        u3 = tl.zeros((WARPS, 32), dtype=tl.float32)
        for q0 in range(begin, end, WARPS * U):
            for u in tl.static_range(U):
                qb = q0 + tl.arange(0, WARPS) * U + u
                ok = (qb < end)[:, None]
                qb = tl.minimum(qb, QB - 1)  # past the end: the last quad block's weights, activations 0
                if HALF2:
                    x0 = _x_word(x_ptr, qb, ok, 0, X_BF16)
                    x1 = _x_word(x_ptr, qb, ok, 1, X_BF16)
                    x2 = _x_word(x_ptr, qb, ok, 2, X_BF16)
                    x3 = _x_word(x_ptr, qb, ok, 3, X_BF16)
                    xsum_lo, xsum_hi = _widen(_hadd2(_hadd2(x0[4], x1[4]), _hadd2(x2[4], x3[4])))
                    xsum = xsum_lo + xsum_hi
                else:  # the float32 path: x0 holds the quads' activations, x1 to x3 are not used
                    x0, xsum = _x_quad(x_ptr, qb, ok, X_BF16)
                    x1 = x0
                    x2 = x0
                    x3 = x0
                a0, a1, a2, a3 = _block_step(w_ptr, scale_ptr, low_ptr, block, qb, QB, GROUPS, x0, x1, x2, x3, xsum,
                                             a0, a1, a2, a3, GROUP, HALF2)
                if PARTS == 2:
                    u0, u1, u2, u3 = _block_step(w_ptr, scale_ptr, low_ptr, up_block, qb, QB, GROUPS, x0, x1, x2,
                                                 x3, xsum, u0, u1, u2, u3, GROUP, HALF2)
        first = tl.program_id(0) * 32
        if SPLIT == 1:
            _store_tile_row(out_ptr, a0, u0, first, N, PARTS)
            _store_tile_row(out_ptr, a1, u1, first + 8, N, PARTS)
            _store_tile_row(out_ptr, a2, u2, first + 16, N, PARTS)
            _store_tile_row(out_ptr, a3, u3, first + 24, N, PARTS)
        else:  # this block's count and partials: one of each per slot and block
            counter = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
            _finish_split(out_ptr, partial_ptr + counter.to(tl.int64) * (SPLIT * 64), count_ptr + counter, a0, a1,
                          a2, a3, u0, u1, u2, u3, first, N, SPLIT, PARTS)


def tiles(n: int, k: int) -> bool:
    """Whether an [n, k] int4 weight takes the kernel's tiled layout (int4.tile): blocks of TILE_ROWS rows (whole
    blocks in each half of a gate/up weight too) and of 4 quads (128 columns)."""
    return n % (2 * TILE_ROWS) == 0 and k % (4 * QUAD_CODES) == 0


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
    packed fp16 arithmetic (inline PTX) where `half2`; `config` (U, WARPS, num_warps, num_stages): that
    configuration instead of the autotuned one (benchmarks)."""
    n, k = out.shape[-1], x.shape[-1]
    if x.data_ptr() % 16:  # bf16 activations are read as 32-bit words
        x = x.clone()
    slots = 1 if experts is None else experts.numel()
    stride_x = k if x.dim() == 2 and x.shape[0] > 1 else 0
    stacked = experts is not None
    args = (x, weight.view(torch.int32), scale, low, out, x if experts is None else experts, n, k // QUAD_CODES,
            scale.shape[-1], n, weight.stride(0) // 4 if stacked else 0, scale.stride(0) if stacked else 0, stride_x,
            slots)
    blocks = n // TILE_ROWS
    split = config.pop("SPLIT", None) or split_for(blocks * slots, k // (4 * QUAD_CODES), x.device)
    partials = out if split == 1 else torch.empty(blocks * slots * split * 64, dtype=torch.float32, device=x.device)
    args = (*args[:6], partials, _counts(x.device), *args[6:])
    options = dict(GROUP=k // scale.shape[-1], SPLIT=split, PARTS=parts, EXPERTS=stacked, HALF2=half2,
                   X_BF16=x.dtype == torch.bfloat16, **pdl(x))
    grid = (blocks, slots, split)
    if config:
        _int4_gemv_kernel.fn[grid](*args, **options, **config)
    else:
        _int4_gemv_kernel[grid](*args, **options)


COUNTS = 1 << 16  # counts a device holds for split products: one per block of rows and slot
_counts_of: dict[torch.device, torch.Tensor] = {}


def _counts(device: torch.device) -> torch.Tensor:
    """The device's counts of finished shares (int32 zeros; each launch sets those it uses back to 0). Kernels on
    one device run one after another (a stream, or CUDA graphs of one), so one set serves them all."""
    if device not in _counts_of:
        _counts_of[device] = torch.zeros(COUNTS, dtype=torch.int32, device=device)
    return _counts_of[device]


def split_for(programs: int, quad_blocks: int, device: torch.device) -> int:
    """Into how many shares to split each block's columns: enough programs for 3 a multiprocessor where a matrix
    has few blocks of rows (Mistral-7B's wqkv, wo and w2: 128-192 blocks on an H100's 132 multiprocessors), each
    share at least 4 quad blocks (512 columns), at most 8 shares. 1 off GPUs. Mistral-7B on an H100: wqkv, wo and w2
    4, w13 and the output 1 (decode 2.55 ms a token, 2.60 unsplit). A sweep of every split found wqkv best unsplit
    and wo and w13 best at 2 (performance log, seventh session): branch int4-split-autotune autotunes the split,
    not measured in decode yet."""
    if device.type != "cuda" or programs > COUNTS:
        return 1
    return column_split(programs, quad_blocks, 3, multiprocessors(device))


@int4_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
      swiglu: bool = False) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // (2 if swiglu else 1))


@int4_experts.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, experts: torch.Tensor,
      swiglu: bool = False) -> torch.Tensor:
    return x.new_empty(experts.numel(), weight.shape[1] // (2 if swiglu else 1))
