"""int4 and int8 weights times a few activation rows (2 to MAX_ROWS: a verify step of speculative decoding, a
batch's decode step, a short prompt), as Triton kernels that read each weight once as it is stored.

Without them such a product converts the whole weight to the activations' dtype in memory first (a bf16 copy
written, then read again: about 8x (int4) or 5x (int8) the bytes of a decode step for Mistral-7B). Here each
program takes a block of 32 weight rows and a part of the columns: it loads 128 columns of the block at a time,
makes them bf16 (or float32) weights in registers and multiplies them with up to 16 activation rows at once on
the tensor cores (`tl.dot`); a second block of 16 activation rows, if any, reads the weight again (from L2 for
all but the largest matrices). Where a matrix has few row blocks the columns are split (`split_k`) and the
parts' float32 sums added after the kernel.

- int4 (`int4_rows_linear`): int4_gemv's tiled layout (int4.tile), q * scale + low per group of GROUP columns.
- int8 (`int8_rows_linear`): the weight row by row ([N, K] int8), the rows' scales applied to the sums.

One activation row stays with int4_gemv and int8_gemv, whose arithmetic suits a single row.
"""

from __future__ import annotations

import torch

from mistral_chat.engine.kernels.fused import AUTOTUNE_CACHE, INTERPRETED, column_split, kernel_op, multiprocessors

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: the dequantized product is used
    triton = None

MAX_ROWS = 64  # more rows (prefill) dequantize, then multiply: the product then costs more than the copy
BLOCK_M = 16  # activation rows a tensor-core product takes at once

if triton is not None:
    _CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4) for s in (2, 3, 4)]
    if INTERPRETED:  # the interpreter times nothing: one configuration
        _CONFIGS = _CONFIGS[:1]
    # compiled once for any row count (Triton would specialize on each size's divisibility by 16 and equality to
    # 1): the two prompts the warm-up prefills (engine/warmup.py) then compile every variant an answer runs
    _ANY_ROWS = ["M", "M_BLOCKS", "SPLIT"]

    @triton.jit
    def _dot_step(x_ptr, w, acc, rows, M, K, kb, IEEE: tl.constexpr):
        """acc ([BLOCK_M, 32]) plus activation rows `rows` of columns kb * 128 .. + 127 times w ([32, 128], in the
        activations' dtype) transposed, on the tensor cores (float32 activations: float32 products, not TF32's)."""
        cols = kb * 128 + tl.arange(0, 128)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=(rows < M)[:, None], other=0.0)
        if IEEE:
            return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        return tl.dot(x, tl.trans(w), acc)

    @triton.jit
    def _store_part(out_ptr, acc, rows, outs, part, M, N):
        """Store the sums acc ([BLOCK_M, 32]) of activation rows `rows` and outputs `outs`: into out ([M, N]), or
        with SPLIT > 1 as float32 into out[part] ([SPLIT, M, N])."""
        out_ptr += part.to(tl.int64) * M * N
        tl.store(out_ptr + rows[:, None] * N + outs[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows < M)[:, None])

    @triton.autotune(configs=_CONFIGS, key=["N", "K"], **AUTOTUNE_CACHE)
    @triton.jit(do_not_specialize=_ANY_ROWS)
    def _int8_rows_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, M_BLOCKS, SPLIT, BLOCK_M: tl.constexpr,
                          IEEE: tl.constexpr):
        """out[m, block * 32 + r] = scale[r] * sum_k x[m, k] * q[r, k] for the 32 rows r of this program's block
        and the activation rows m of its row block (int8 weights [N, K] and their rows' scales [N]). With
        SPLIT > 1, as _int4_rows_kernel: float32 sums of a part of the columns into out[part]."""
        block = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        outs = block * 32 + tl.arange(0, 32)
        c = tl.arange(0, 128)
        kb_count = K // 128
        per_part = tl.cdiv(kb_count, SPLIT)
        acc = tl.zeros((BLOCK_M, 32), dtype=tl.float32)
        for kb in range(part * per_part, tl.minimum(part * per_part + per_part, kb_count)):
            w = tl.load(w_ptr + outs[:, None] * K + (kb * 128 + c)[None, :]).to(x_ptr.dtype.element_ty)  # exact
            acc = _dot_step(x_ptr, w, acc, rows, M, K, kb, IEEE)
        _store_part(out_ptr, acc * tl.load(scale_ptr + outs).to(tl.float32)[None, :], rows, outs, part, M, N)

    @triton.autotune(configs=_CONFIGS, key=["N", "K", "GROUP"], **AUTOTUNE_CACHE)
    @triton.jit(do_not_specialize=_ANY_ROWS)
    def _int4_rows_kernel(x_ptr, w_ptr, scale_ptr, low_ptr, out_ptr, M, N, K, M_BLOCKS, SPLIT,
                          GROUP: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
        """out[m, block * 32 + r] = sum_k x[m, k] * (q[r, k] * scale[r, k // GROUP] + low[r, k // GROUP]) for the
        32 rows r of this program's block and the activation rows m of its row block. The tiled weight: per
        (block, 128 columns) 2,048 bytes [4 rt, 4 j, 8 i, 16 bytes], row rt * 8 + i, columns 32 j + 2 byte +
        nibble; scales and lows [N / 32, groups, 32]. With SPLIT > 1 each of SPLIT programs takes a part of the
        columns and writes its float32 sums to out[part] ([SPLIT, M, N]), which the caller adds up."""
        block = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        r = tl.arange(0, 32)
        b = tl.arange(0, 64)
        # a row's 64 bytes of 128 columns, in the block's 2,048 (int4.tile)
        byte_at = (r // 8)[:, None] * 512 + (b // 16)[None, :] * 128 + (r % 8)[:, None] * 16 + (b % 16)[None, :]
        PER: tl.constexpr = 128 // GROUP  # groups in 128 columns
        g = tl.arange(0, PER)
        groups = K // GROUP
        kb_count = K // 128
        per_part = tl.cdiv(kb_count, SPLIT)
        acc = tl.zeros((BLOCK_M, 32), dtype=tl.float32)
        for kb in range(part * per_part, tl.minimum(part * per_part + per_part, kb_count)):
            packed = tl.load(w_ptr + (block * kb_count + kb) * 2048 + byte_at).to(tl.int32)
            codes = tl.join(packed & 15, packed >> 4).reshape(32, 128).to(tl.float32)  # column 2 byte + nibble
            at = (block * groups + kb * PER + g)[None, :] * 32 + r[:, None]  # [32, PER]
            scale = tl.load(scale_ptr + at).to(tl.float32)
            low = tl.load(low_ptr + at).to(tl.float32)
            w = codes.reshape(32, PER, GROUP) * scale[:, :, None] + low[:, :, None]
            acc = _dot_step(x_ptr, w.reshape(32, 128).to(x_ptr.dtype.element_ty), acc, rows, M, K, kb, IEEE)
        _store_part(out_ptr, acc, rows, block * 32 + r, part, M, N)


def takes(x: torch.Tensor) -> bool:
    """Whether these kernels are the product for activations x ([..., K]): 2 to MAX_ROWS rows."""
    return 1 < x.numel() // x.shape[-1] <= MAX_ROWS


def int8_fits(weight: torch.Tensor) -> bool:
    """Whether int8_rows_linear takes this int8 weight ([N, K]): contiguous, whole blocks of 32 rows and of 128
    columns."""
    return weight.is_contiguous() and weight.shape[0] % 32 == 0 and weight.shape[1] % 128 == 0


@kernel_op("mistral_chat::int4_rows_linear")
def int4_rows_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """x ([..., K], MAX_ROWS rows at most) times the int4 weight (int4.tile's layout: packed [N, K / 2] uint8,
    scale and low [N, groups]) transposed: [..., N]."""
    assert triton is not None, "int4_rows_linear needs Triton"
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k).contiguous()
    out, grid, sizes, split = _launch_parts(rows, n)
    _int4_rows_kernel[grid](rows, weight, scale.contiguous(), low.contiguous(), out, *sizes, GROUP=k // scale.shape[-1],
                            BLOCK_M=BLOCK_M, IEEE=x.dtype == torch.float32)
    return (out.sum(0).to(x.dtype) if split > 1 else out).reshape(*x.shape[:-1], n)


@kernel_op("mistral_chat::int8_rows_linear")
def int8_rows_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ([..., K], MAX_ROWS rows at most) times the int8 weight ([N, K], `int8_fits`) transposed, each output
    column times its row's scale ([N]): [..., N]."""
    assert triton is not None, "int8_rows_linear needs Triton"
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k).contiguous()
    out, grid, sizes, split = _launch_parts(rows, n)
    _int8_rows_kernel[grid](rows, weight, scale.contiguous(), out, *sizes, BLOCK_M=BLOCK_M,
                            IEEE=x.dtype == torch.float32)
    return (out.sum(0).to(x.dtype) if split > 1 else out).reshape(*x.shape[:-1], n)


def _launch_parts(rows: torch.Tensor, n: int) -> tuple[torch.Tensor, tuple, tuple, int]:
    """For activation rows ([M, K]) and N outputs: the kernel's output ([M, N] in their dtype, or [split, M, N]
    float32 sums), its grid, its size arguments (M, N, K, M_BLOCKS, SPLIT) and the split."""
    (m, k), blocks = rows.shape, triton.cdiv(rows.shape[0], BLOCK_M)
    split = split_k(n // 32 * blocks, k // 128, rows.device)
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device) if split == 1 else \
        torch.empty(split, m, n, dtype=torch.float32, device=rows.device)
    return out, (n // 32, split, blocks), (m, n, k, blocks, split), split


def split_k(programs: int, steps: int, device: torch.device) -> int:
    """Parts of the columns to run apart (1, 2, 4 or 8): enough programs for two per SM where a matrix has few
    row blocks (Mistral-7B's wo: 128 on an H100's 132 SMs), each part at least 4 steps of 128 columns."""
    return column_split(programs, steps, 2, multiprocessors(device) if device.type == "cuda" else 4)



@int4_rows_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@int8_rows_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
