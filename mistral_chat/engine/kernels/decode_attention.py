"""Decode attention (a few query tokens over the KV cache) as one Triton kernel: "flash-decoding".

model.py's `grouped_attention` runs two matrix products and a softmax between them, three or more kernels that
each write their result out and read it back; at decode the products are tiny (one to sixteen query rows per
head), so the launches and round trips cost more than the reading of K and V. Here one program takes one KV head
of one sequence and all the query rows of its group (G heads x T tokens, padded to BLOCK_M >= 16 rows for
`tl.dot`), and runs an online softmax (float32) over tiles of BLOCK_S keys, reading each key and value once. A
long cache is split into ranges of keys handled by separate programs (enough of them to fill the GPU: about
PROGRAMS in all), each writing its normalized partial output and log-sum-exp; a small second kernel combines
them. With a single range the first kernel writes the output itself. Head dimensions that are not a power of two
are padded with masked loads. Fully masked tiles or ranges give zero weight, never NaN.

A range holds at least MIN_SPLIT = 64 keys (one tile). Measurements against inductor's compiled
`grouped_attention`: docs/engine.md.

`decode_attention(q, k, v, mask)` is a torch custom op (one opaque call for torch.compile and CUDA graphs) that
computes what `grouped_attention` computes, for strided q ([B, H, T, D]), k and v ([B, Hkv, S, D], slices of the
cache) and mask ([T, S] bool, or [B, T, S]: a mask per sequence, as continuous batching's rows at positions of
their own have, with each row's length so that a row reads only up to its last visible key). It runs where the
plan's `attention` is "triton" (CUDA with Triton, or the CPU under Triton's interpreter, TRITON_INTERPRET=1,
which the tests use).
"""

from __future__ import annotations

import torch

from mistral_chat.engine.kernels.fused import INTERPRETED, kernel_op, pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: the plain formula is used
    triton = None
else:
    from mistral_chat.engine.kernels.fused import start_next, wait_previous


BLOCK_S = 64  # keys per tile
MIN_SPLIT = 64  # fewest keys per range of a split cache (a multiple of BLOCK_S)
MAX_SPLITS = 64  # most ranges per sequence and head (the combine kernel reads them all at once)
PROGRAMS = 264  # programs to aim for on a long cache: two per SM of a 132-SM H100
WARPS = 4  # warps per program of the attention kernel


if triton is not None:
    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, len_ptr, out_ptr, part_ptr, lse_ptr, S, SPLIT, D, T, G,
                          HEADS_KV, sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, sm_b, sm_t,
                          sm_s, scale, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                          DIRECT: tl.constexpr, LENGTHS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                          PDL: tl.constexpr):
        """Online softmax of one (sequence, KV head)'s query rows m = g T + t over keys [split SPLIT, + SPLIT);
        LENGTHS: only keys below the sequence's length (len_ptr[b]), none of those after it being allowed.

        DOT: the dtype of tl.dot's operands, the inputs' own except under the interpreter, whose tl.dot multiplies
        bfloat16's raw bits as integers (Triton 3.9): there float32, of the same rounded values."""
        start_next(PDL)
        wait_previous(PDL)
        bh, split = tl.program_id(0), tl.program_id(1)
        b, hkv = bh // HEADS_KV, bh % HEADS_KV
        m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        row_ok, d_ok = m < G * T, d < D
        head, t = hkv * G + m // T, m % T
        q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + t[:, None] * sq_t + d[None, :] * sq_d,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
        k_base = k_ptr + b * sk_b + hkv * sk_h
        v_base = v_ptr + b * sv_b + hkv * sv_h
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        start = split * SPLIT
        end = tl.minimum(start + SPLIT, S)
        if LENGTHS:
            end = tl.minimum(end, tl.load(len_ptr + b))
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < end
            kv_ok = s_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + s[:, None] * sk_s + d[None, :] * sk_d, mask=kv_ok, other=0.0).to(DOT)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # log2 units: exp2 below
            allowed = tl.load(mask_ptr + b * sm_b + t[:, None] * sm_t + s[None, :] * sm_s,
                              mask=row_ok[:, None] & s_ok[None, :], other=0)
            scores = tl.where(allowed != 0, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exp2(-inf - 0) = 0, not NaN
            p = tl.exp2(scores - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            v = tl.load(v_base + s[:, None] * sv_s + d[None, :] * sv_d, mask=kv_ok, other=0.0).to(DOT)
            p_in = p.to(v_ptr.dtype.element_ty).to(DOT)  # rounded to the inputs' dtype, as grouped_attention
            acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        row = bh * G * T + m  # the rows of one KV head's query heads are consecutive in [B, H, T] order
        ok = row_ok[:, None] & d_ok[None, :]
        if DIRECT:
            tl.store(out_ptr + row[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            splits = tl.num_programs(1)
            tl.store(part_ptr + (row[:, None] * splits + split) * D + d[None, :], out, mask=ok)
            tl.store(lse_ptr + row * splits + split, m_i + tl.log2(l_i), mask=row_ok)  # -inf if nothing allowed

    @triton.jit
    def _combine_kernel(part_ptr, lse_ptr, out_ptr, splits, D, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
                        PDL: tl.constexpr):
        """out[row] = the ranges' partial outputs weighted by their share exp2(lse) of the softmax's sum."""
        start_next(PDL)
        wait_previous(PDL)
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK_SPLITS)
        d = tl.arange(0, BLOCK_D)
        lse = tl.load(lse_ptr + row * splits + i, mask=i < splits, other=float("-inf"))
        top = tl.max(lse, axis=0)
        w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
        part = tl.load(part_ptr + (row * splits + i[:, None]) * D + d[None, :],
                       mask=(i[:, None] < splits) & (d[None, :] < D), other=0.0)
        total = tl.sum(w, axis=0)
        out = tl.sum(part * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def split_size(keys: int, programs: int) -> int:
    """Keys per range: whole tiles, at least MIN_SPLIT, and ranges enough for about PROGRAMS programs in all
    (`programs`: the programs per range), at most MAX_SPLITS."""
    splits = max(1, min(MAX_SPLITS, triton.cdiv(PROGRAMS, programs), triton.cdiv(keys, MIN_SPLIT)))
    return triton.cdiv(triton.cdiv(keys, splits), BLOCK_S) * BLOCK_S


@kernel_op("mistral_chat::decode_attention")
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q ([B, H, T, D]) over k, v ([B, Hkv, S, D]) under mask ([T, S] bool, or [B, T, S] per
    sequence), as grouped_attention; a new contiguous [B, H, T, D] tensor of q's dtype. `lengths` ([B] int32, with
    a mask per sequence): keys from lengths[b] on are masked for sequence b and not read (`visible_lengths`)."""
    assert triton is not None, "decode_attention needs Triton"
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
    block_m = min(64, max(16, triton.next_power_of_2(g * t)))
    row_blocks = triton.cdiv(g * t, block_m)
    split = split_size(s, b * hkv * row_blocks)
    splits = triton.cdiv(s, split)
    part = lse = out  # unused with one range
    if splits > 1:
        part = torch.empty((b * h * t, splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b * h * t, splits), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))
    mask_strides = mask.stride() if mask.dim() == 3 else (0, *mask.stride())
    _attention_kernel[(b * hkv, splits, row_blocks)](
        q, k, v, mask, out if lengths is None else lengths, out, part, lse, s, split, d, t, g, hkv, *q.stride(),
        *k.stride(), *v.stride(), *mask_strides, d ** -0.5 * 1.4426950408889634, BLOCK_M=block_m, BLOCK_S=BLOCK_S,
        BLOCK_D=block_d, DIRECT=splits == 1, LENGTHS=lengths is not None,
        DOT=tl.float32 if INTERPRETED else getattr(tl, str(q.dtype).removeprefix("torch.")),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=WARPS, **pdl(q))
    if splits > 1:
        _combine_kernel[(b * h * t,)](part, lse, out, splits, d, BLOCK_SPLITS=triton.next_power_of_2(splits),
                                      BLOCK_D=block_d, num_warps=4, **pdl(q))
    return out


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
      lengths: torch.Tensor | None = None) -> torch.Tensor:
    return q.new_empty(q.shape)


def visible_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Per sequence of a [B, T, S] mask, one past the last key any of its queries may see ([B] int32): what
    `decode_attention` reads of each row. Continuous batching's rows at short positions in a long cache bucket
    then read their own keys only."""
    slots = torch.arange(1, mask.shape[-1] + 1, dtype=torch.int32, device=mask.device)
    return torch.where(mask.any(dim=1), slots, 0).amax(dim=-1).to(torch.int32)
