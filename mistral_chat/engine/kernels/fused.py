"""RMSNorm (with the residual add before it), RoPE (with the cache writes after it) and SwiGLU's activation as one
Triton kernel each, for the model's eager paths on GPUs (and `rope_and_cache` for compiled decode too).

Under torch.compile inductor fuses these itself. Eagerly (prefill, which runs eagerly by default, and
`--no-compile`), PyTorch runs each small op of their formulas as its own kernel, and a long prefill spends a third
of its time in them (docs/engine.md). Each kernel reads its input once and writes its output once, and computes what
the eager formula computes (float32 inside, the same roundings to the model dtype), up to the order of a float32
sum.

The model runs them where its plan's `fused` is set (plan.py: CUDA with Triton, or the CPU under Triton's
interpreter, TRITON_INTERPRET=1, which the tests use), and not while torch.compile traces; `rope_fits` and
`rope_and_cache_fits` say which head sizes they take. `rope_and_cache` is a custom op, so compiled decode calls it
too. `silu_and_mul(gate_up, kernel)` picks the kernel or the formula.

`pdl(x)`, `start_next` and `wait_previous`: programmatic dependent launch for the engine's kernels that run in
decode (rope_and_cache, the GEMV and decode attention kernels, the Lamport all-reduce) on H100/H200 GPUs.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds may ship without Triton: the plain formulas run
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# autotuned kernels keep their timings in Triton's cache on disk, so that later start-ups skip the tuning (Triton
# >= 3.2; the product kernels' tuning took seconds before a first answer)
AUTOTUNE_CACHE = {"cache_results": True} if triton is not None and \
    "cache_results" in inspect.signature(triton.autotune).parameters else {}


def kernel_op(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: the function registered as the custom op `name` (not mutating its arguments, as far as
    torch.compile knows), which compiled code calls as one opaque op; eager code and CUDA graph captures call the
    function itself. A custom op's first eager call imports torch._dynamo: 1-4.5 s of every start-up (measured on
    an H100 machine), for a compiler the default plan never runs. `register_fake` is the op's."""

    def wrap(fn: Callable[..., Any]) -> Any:
        op = torch.library.custom_op(name, mutates_args=())(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)

        call.register_fake = op.register_fake  # type: ignore[attr-defined]
        return call

    return wrap


def triton_runs(x: torch.Tensor) -> bool:
    """Whether Triton kernels can run on x's device: CUDA with Triton, or the CPU under Triton's interpreter (the
    engine's other kernels, int8_gemv and decode_attention, ask this too)."""
    return triton is not None and (x.is_cuda or INTERPRETED)


def capability_major(x: torch.Tensor) -> int:
    """The major compute capability of the GPU holding x (a CUDA tensor): 9 for H100 and H200."""
    return _capability_major(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """The CUDA device's multiprocessor count (SMs: 132 on an H100), for kernels that size their grids to it."""
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def column_split(programs: int, column_blocks: int, per_multiprocessor: int, multiprocessors: int) -> int:
    """Into how many parts (1, 2, 4 or 8) a product kernel splits each block of rows' columns: doubled while the
    grid has fewer than `per_multiprocessor` programs a multiprocessor and each part keeps at least 8 blocks of
    128 columns (quant_rows.split_k, int4_gemv.split_for)."""
    split = 1
    while split < 8 and programs * split < per_multiprocessor * multiprocessors and column_blocks >= 8 * split:
        split *= 2
    return split


def pdl(x: torch.Tensor) -> dict:
    """Launch options for a kernel on x's device that takes a `PDL` constexpr: programmatic dependent launch on
    GPUs of compute capability 9.0 and later (H100, H200). Such a kernel may be started
    while the kernel before it still runs: it calls `start_next` first (so the next kernel may start too) and
    `wait_previous` before it reads anything an earlier kernel wrote (a product loads its first weights before).
    Every kernel launched so must wait, so that each kernel's wait covers every kernel before it."""
    on = x.is_cuda and not INTERPRETED and capability_major(x) >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


if triton is not None:
    @triton.jit
    def start_next(PDL: tl.constexpr):
        """PDL: let the next kernel's programs start (they load what no kernel writes, such as weights, then
        wait in `wait_previous`); called first thing, so that they are ready when this kernel ends."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def wait_previous(PDL: tl.constexpr):
        """PDL: wait until the previous kernel has finished and its writes show (and so every kernel before it)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, dim, stride_x, eps, delta_ptr, stride_delta, sum_ptr,
                         BLOCK: tl.constexpr, ADD: tl.constexpr):
        """RMSNorm of row x; ADD: of x + delta instead (rounded to x's dtype, as the eager add), stored to sum."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < dim
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if ADD:
            delta = tl.load(delta_ptr + row * stride_delta + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * dim + cols, x, mask=ok)
        xf = x.to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / dim + eps)
        normed = (xf * scale).to(x.dtype).to(tl.float32)  # eager: rounds to the model dtype, then * weight
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * dim + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_kernel(x_ptr, rope_ptr, out_ptr, t, heads, stride_b, stride_t, stride_h,
                     HALF: tl.constexpr, HEADS: tl.constexpr):
        bt = tl.program_id(0)  # one (batch, position) per program, all its heads, each head's row read whole
        b, pos = bt // t, bt % t
        h = tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, 2 * HALF)[None, :]
        ok = h < heads
        x = tl.load(x_ptr + b * stride_b + pos * stride_t + h * stride_h + d, mask=ok, other=0.0).to(tl.float32)
        x0, x1 = tl.split(tl.reshape(x, (HEADS, HALF, 2)))  # each interleaved pair's two halves, in registers
        pair = rope_ptr + pos * 2 * HALF + tl.arange(0, HALF)[None, :] * 2
        cos, sin = tl.load(pair), tl.load(pair + 1)
        out = tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), (HEADS, 2 * HALF))
        tl.store(out_ptr + bt * heads * 2 * HALF + h * 2 * HALF + d, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_and_cache_kernel(qkv_ptr, rope_ptr, slots_ptr, q_ptr, k_ptr, v_ptr, t, n_q, n_kv, stride_row,
                               rope_b, slots_b, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, HALF: tl.constexpr,
                               HEADS: tl.constexpr, PDL: tl.constexpr):
        """One token's row of fused q/k/v heads (q, then k, then v), HEADS of them per program: q and k heads
        rotated, q heads into q ([B, T, n_q, D]), k and v heads into the cache at the token's slot. rope_b and
        slots_b: 0 where all sequences share positions, else each sequence's own table and slots."""
        start_next(PDL)
        wait_previous(PDL)
        bt = tl.program_id(0)
        b, pos = bt // t, bt % t
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)[:, None]  # head index in the row: q, k, then v
        d = tl.arange(0, 2 * HALF)[None, :]
        in_row = h < n_q + 2 * n_kv
        x = tl.load(qkv_ptr + bt * stride_row + h * 2 * HALF + d, mask=in_row, other=0.0)
        x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (HEADS, HALF, 2)))
        pair = rope_ptr + b * rope_b + pos * 2 * HALF + tl.arange(0, HALF)[None, :] * 2
        cos, sin = tl.load(pair), tl.load(pair + 1)
        rotated = tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), (HEADS, 2 * HALF))
        out = tl.where(h < n_q + n_kv, rotated.to(x.dtype), x)  # v heads are not rotated
        tl.store(q_ptr + (bt * n_q + h) * 2 * HALF + d, out, mask=h < n_q)
        slot = tl.load(slots_ptr + b * slots_b + pos)
        is_k = (h >= n_q) & (h < n_q + n_kv)
        tl.store(k_ptr + b * sk_b + (h - n_q) * sk_h + slot * sk_s + d, out, mask=is_k)
        is_v = (h >= n_q + n_kv) & in_row
        tl.store(v_ptr + b * sv_b + (h - n_q - n_kv) * sv_h + slot * sv_s + d, out, mask=is_v)

    @triton.jit
    def _swiglu_kernel(gate_up_ptr, out_ptr, hidden, stride_row, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < hidden
        gate = tl.load(gate_up_ptr + row * stride_row + cols, mask=ok, other=0.0)
        up = tl.load(gate_up_ptr + row * stride_row + hidden + cols, mask=ok, other=0.0).to(tl.float32)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # eager: SiLU rounds, then * up
        tl.store(out_ptr + row * hidden + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's last dimension: (x / rms(x)) rounded to x's dtype, times weight (as RMSNorm.forward)."""
    dim, rows = x.shape[-1], _rows(x)
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, dim, rows.stride(0), eps, rows, 0, rows,
                                       BLOCK=triton.next_power_of_2(dim), ADD=False,
                                       num_warps=8 if dim >= 4096 else 4)
    return out.view(*x.shape[:-1], dim)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm of it) in one kernel, as the add and then rms_norm compute them: the residual stream
    is read once for both (eager prefill: one kernel a norm fewer, and 16 MB less traffic for 2048 tokens)."""
    dim, rows, deltas = x.shape[-1], _rows(x), _rows(delta)
    total = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, dim, rows.stride(0), eps, deltas, deltas.stride(0), total,
                                       BLOCK=triton.next_power_of_2(dim), ADD=True,
                                       num_warps=8 if dim >= 4096 else 4)
    return total.view(x.shape), out.view(*x.shape[:-1], dim)


def rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x ([B, T, H, D], last dimension contiguous) with its interleaved pairs rotated by table ([T, D/2, 2]
    float32), as apply_rope computes it; a new contiguous tensor."""
    b, t, heads, d = x.shape
    assert x.stride(-1) == 1 and table.dtype == torch.float32
    table = table.contiguous()
    out = torch.empty((b, t, heads, d), dtype=x.dtype, device=x.device)
    padded = triton.next_power_of_2(heads)
    _rope_kernel[(b * t,)](x, table, out, t, heads, x.stride(0), x.stride(1), x.stride(2),
                           HALF=d // 2, HEADS=padded, num_warps=8 if padded * d > 4096 else 4)
    return out


ROPE_CACHE_HEADS = 8  # heads per program of rope_and_cache


# Declared as not mutating its arguments, though it writes the caches: torch.compile (2.13) fails on custom ops
# that mutate arguments inside a nested compile region (a transformer block under quick compile). So compiled
# code calls it only where the caches' one reader is the decode attention kernel, which takes the q it returns
# and so runs after the writes (model.Attention.forward); eager code runs in program order.
@kernel_op("mistral_chat::rope_and_cache")
def rope_and_cache(qkv: torch.Tensor, table: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, n_q: int) -> torch.Tensor:
    """The step between the q/k/v projection and attention, as one kernel: of qkv ([B, T, (n_q + 2 n_kv) D], q
    heads then k then v), the q heads rotated by table ([T, D/2, 2] float32) are returned ([B, T, n_q, D]), and
    the k heads (rotated) and v heads are written into k_cache and v_cache ([B, n_kv, S, D]) at slots ([T]).
    Sequences at positions of their own (continuous batching's rows) give table [B, T, D/2, 2] and slots [B, T].
    As apply_rope then LayerKVCache.update compute it, where inductor made three kernels of it in decode and eager
    prefill ran four (RoPE of q and of k, and a copy each into the caches)."""
    b, t, _ = qkv.shape
    n_kv, d = k_cache.shape[1], k_cache.shape[-1]
    rows = _rows(qkv)
    q = torch.empty((b, t, n_q, d), dtype=qkv.dtype, device=qkv.device)
    grid = (b * t, triton.cdiv(n_q + 2 * n_kv, ROPE_CACHE_HEADS))
    table, slots = table.contiguous(), slots.contiguous()
    rope_b = table[0].numel() if table.dim() == 4 else 0
    slots_b = t if slots.dim() == 2 else 0
    _rope_and_cache_kernel[grid](rows, table, slots, q, k_cache, v_cache, t, n_q, n_kv, rows.stride(0), rope_b,
                                 slots_b, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                 v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                                 HALF=d // 2, HEADS=ROPE_CACHE_HEADS, num_warps=4, **pdl(qkv))
    return q


@rope_and_cache.register_fake
def _(qkv: torch.Tensor, table: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
      n_q: int) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], n_q, k_cache.shape[-1])


def rope_and_cache_fits(head_dim: int) -> bool:
    """Whether `rope_and_cache` takes heads of `head_dim`: a power-of-two half (also under torch.compile, where it
    runs as an opaque op)."""
    half = head_dim // 2
    return half & (half - 1) == 0


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, where gate_up ([..., 2H]) holds gate then up: as F.silu(gate) * up."""
    hidden = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], hidden), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(hidden))
    _swiglu_kernel[(rows.shape[0], triton.cdiv(hidden, block))](rows, out, hidden, rows.stride(0), BLOCK=block,
                                                                num_warps=4)
    return out.view(*gate_up.shape[:-1], hidden)


def rope_fits(x: torch.Tensor) -> bool:
    """Whether `rope` handles x ([B, T, H, D]): a power-of-two half head dimension, the last dimension contiguous."""
    half = x.shape[-1] // 2
    return half & (half - 1) == 0 and x.stride(-1) == 1


def silu_and_mul(gate_up: torch.Tensor, kernel: bool = False) -> torch.Tensor:
    """SwiGLU's activation SiLU(gate) * up of gate_up ([..., 2H], gate first): with `kernel` (the plan's `fused`),
    in one Triton kernel outside torch.compile (which fuses the formula itself)."""
    if kernel and not torch.compiler.is_compiling():
        return swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
