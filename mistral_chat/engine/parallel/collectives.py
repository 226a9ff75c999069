"""The collectives of tensor parallelism: sums of row-parallel products, the embedding and the logits.

With one process every function here is the identity. Under torch.compile the functional collectives trace into
the decode graph; in eager mode the in-place c10d ones run (NCCL on GPUs, gloo on the CPU).

On GPUs, small all-reduces (decode's: 2 per layer) go through symmetric memory instead of NCCL once
`enable_fast_all_reduce` ran on every rank, with the kernel the plan names (`KernelPlan.all_reduce`): `lamport`
(lamport_all_reduce.py: each rank writes into every peer's buffer and the data is its own flag, no barrier; bf16),
or `symmetric` (torch's one-shot kernel: copy in, wait for every peer, sum, wait again; float32). Where the Lamport
kernel carries them, the product before an all-reduce pushes its outputs into the peers' buffers itself
(`linear_all_reduce_residual`), and the all-reduce adds the residual and weighs by the next norm's weight.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from mistral_chat.engine.parallel.sharding import Parallel

log = logging.getLogger(__name__)

FAST_ALL_REDUCE_BYTES = 1 << 20  # the largest all-reduce sent through symmetric memory (decode: 8 KB a token)
_fast_buffer: torch.Tensor | None = None  # this rank's symmetric-memory buffer (read by the op, outside tracing)
_fast_kernel: Any = None  # a LamportAllReduce when that kernel carries the fast route, else None (torch's kernel)
# what the traced code may read (plain values: torch.compile guards on them instead of lifting a tensor); one
# model group per process: (group name, dtype, elements) of its buffer, or None
_fast_route: tuple[str, torch.dtype, int] | None = None
# torch's symmetric memory numbers its handle exchanges for the whole process: a second group in a process whose
# peers are fresh (rank 0 starting another --tp run, e.g. `bench --tp 2,4`) waits forever for keys they never
# write (seen on 4x H100). So only the first tensor-parallel group of a process takes the fast path.
_symmetric_memory_used = False


_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.13


def gather_vocab(logits: torch.Tensor, parallel: Parallel) -> torch.Tensor:
    """Concatenate each rank's vocabulary slice of the logits."""
    if not parallel.enabled:
        return logits
    if torch.compiler.is_compiling():
        gathered = _all_gather(logits.contiguous(), 0, parallel.process_group)  # [world * B, ...]
        return torch.cat(gathered.chunk(parallel.world, dim=0), dim=-1)
    parts = [torch.empty_like(logits) for _ in range(parallel.world)]
    dist.all_gather(parts, logits.contiguous(), group=parallel.group)
    return torch.cat(parts, dim=-1)


def all_reduce(x: torch.Tensor, parallel: Parallel) -> torch.Tensor:
    """Sum the partial results of a row-parallel projection across ranks.

    Under torch.compile a functional collective, which traces into the decode graph (and its CUDA graph);
    in eager mode the in-place c10d one, which launches several times faster.
    """
    if not parallel.enabled:
        return x
    group_name = _fast_group(x, parallel)
    if group_name is not None:
        return torch.ops.mistral_chat.fast_all_reduce(x, group_name)
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, "sum", parallel.process_group)
    dist.all_reduce(x, group=parallel.group)
    return x


def all_reduce_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        parallel: Parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """residual + the sum of x across ranks, and that times `weight` (the next RMSNorm's weight, for a product that
    computes the norm's scale itself: gemv.linear_row's norm_of): in the Lamport kernel's last step where it
    carries the all-reduce (no kernel of their own), else as plain ops after the all-reduce."""
    group_name = _fast_group(x, parallel)
    if group_name is not None:
        return torch.ops.mistral_chat.fast_all_reduce_residual(x, residual, weight, group_name)
    h = residual + all_reduce(x, parallel)
    return h, h * weight


def linear_all_reduce_residual(x: torch.Tensor, linear: Any, residual: torch.Tensor, weight: torch.Tensor,
                               parallel: Parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """`all_reduce_residual(linear(x), residual, weight, parallel)` for a row-parallel projection `linear` (a
    gemv.Linear) of one row. Where the Lamport kernel carries the all-reduces, the product's kernel pushes its
    outputs straight into the ranks' buffers and the all-reduce only sums them (no kernel reads and sends this
    rank's part); otherwise the product, then the all-reduce."""
    group_name = _fast_group(residual, parallel)
    if (group_name is not None and linear.bias is None and linear.weight.stride(-1) == 1
            and x.numel() == x.shape[-1] and residual.numel() == linear.weight.shape[0]):
        return torch.ops.mistral_chat.linear_all_reduce_residual(x, linear.weight, residual, weight, group_name)
    return all_reduce_residual(linear(x), residual, weight, parallel)


def experts_all_reduce_residual(act: torch.Tensor, w2: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor,
                                residual: torch.Tensor, weight: torch.Tensor,
                                parallel: Parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear_all_reduce_residual` for the chosen experts' w2 (experts_gemv.experts_down of act ([k, hidden])
    with the routing weights): pushed into the Lamport buffers by the experts' kernel where it can, else the
    product, then the all-reduce."""
    group_name = _fast_group(residual, parallel)
    if group_name is not None and residual.numel() == w2.shape[1]:
        return torch.ops.mistral_chat.linear_all_reduce_residual(act, w2, residual, weight, group_name, experts,
                                                                 routing)
    from mistral_chat.engine.kernels import experts_gemv

    out = experts_gemv.experts_down(act, w2, experts, routing)
    return all_reduce_residual(out.view(residual.shape), residual, weight, parallel)


def _fast_group(x: torch.Tensor, parallel: Parallel) -> str | None:
    """The group's name when `x` may take the symmetric-memory path: a buffer of its dtype holds it, and its size
    is fixed (decode; prefill compiled for any prompt length goes through NCCL)."""
    if _fast_route is None:
        return None
    name, dtype, capacity = _fast_route
    numel = x.numel()
    if x.dtype != dtype or not isinstance(numel, int) or numel > capacity:
        return None
    return name


@torch.library.custom_op("mistral_chat::fast_all_reduce", mutates_args=())
def fast_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of `x` over the group, into a new tensor: a one-shot all-reduce through the ranks' symmetric buffers,
    by the Lamport kernel (each rank writes `x` into every peer's buffer and reads its own once filled) or torch's
    (copy `x` in, wait for every rank's copy, sum, wait again before the buffer is reused).

    An opaque op for torch.compile, so the buffer stays the one allocated at load, outside any CUDA graph's pool.
    """
    buffer = _fast_buffer
    assert buffer is not None, "enable_fast_all_reduce first"
    x = _aligned(x)
    out = x.new_empty(x.shape)
    _one_shot(buffer, x, group_name, out)
    return out


@torch.library.custom_op("mistral_chat::fast_all_reduce_residual", mutates_args=())
def fast_all_reduce_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`fast_all_reduce`, then residual + the sum and that times weight (see `all_reduce_residual`): inside the
    Lamport kernel, or after torch's."""
    if _fast_kernel is None:
        h = residual + fast_all_reduce(x, group_name)
        return h, h * weight
    x = _aligned(x)
    h, weighted = x.new_empty(x.shape), x.new_empty(x.shape)
    _fast_kernel(x, h, residual.contiguous(), weight.expand(x.shape).contiguous(), weighted)
    return h, weighted


@torch.library.custom_op("mistral_chat::linear_all_reduce_residual", mutates_args=())
def linear_all_reduce_residual_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                                  norm_weight: torch.Tensor, group_name: str, experts: torch.Tensor | None = None,
                                  routing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See `linear_all_reduce_residual`: the GEMV kernel pushes x @ weight.T into the Lamport buffers, then the
    Lamport kernel sums them, adds the residual and weighs by the norm's weight (the product, then
    `fast_all_reduce_residual`, where torch's kernel carries the all-reduces). With `experts` and `routing`,
    weight is the stacked experts' w2 and the product experts_gemv.experts_down's (`experts_all_reduce_residual`)."""
    from mistral_chat.engine.kernels import experts_gemv, gemv

    if _fast_kernel is None:
        product = gemv.linear_row(x, weight) if experts is None else experts_gemv.experts_down(x, weight, experts,
                                                                                               routing)
        return fast_all_reduce_residual(product.view(residual.shape), residual, norm_weight, group_name)
    if experts is None:
        gemv.linear_row_to_peers(x, weight, _fast_kernel)
    else:
        experts_gemv.experts_down_to_peers(x, weight, experts, routing, _fast_kernel)
    h, weighted = residual.new_empty(residual.shape), residual.new_empty(residual.shape)
    _fast_kernel.receive(h, residual.contiguous(), norm_weight.expand(residual.shape).contiguous(), weighted)
    return h, weighted


@linear_all_reduce_residual_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, group_name: str,
      experts: torch.Tensor | None = None, routing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)


@fast_all_reduce_residual.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
      group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _one_shot(buffer: torch.Tensor, x: torch.Tensor, group_name: str, out: torch.Tensor) -> None:
    """The Lamport kernel if set up, else torch's one-shot all-reduce kernel (a test on the CPU puts a gloo
    all-reduce here)."""
    if _fast_kernel is not None:
        _fast_kernel(x, out)
        return
    torch.ops.symm_mem.one_shot_all_reduce_copy_out(buffer.narrow(0, 0, x.numel()).view(x.shape), x, "sum",
                                                    group_name, out)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x contiguous and 16-byte aligned, as the kernels want their input (like the buffer)."""
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 16 else x


@fast_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return x.new_empty(x.shape)


def enable_fast_all_reduce(parallel: Parallel, device: torch.device, dtype: torch.dtype, kernel: str) -> str:
    """Set up symmetric-memory all-reduces for `parallel`'s group with `kernel` (the plan's all_reduce: "lamport"
    or "symmetric"; anything else keeps c10d); every rank must call it, after loading. Returns the kernel that
    carries the all-reduces from now on: `kernel`, or "c10d" where symmetric memory failed.

    Each rank allocates its buffer, the ranks exchange handles, and one all-reduce checks the sum; the ranks agree
    on the outcome, so either all take the fast path or none does (then c10d carries every all-reduce).
    """
    choice = kernel
    if not parallel.enabled or device.type != "cuda" or choice not in ("lamport", "symmetric"):
        return "c10d" if parallel.enabled else "none"
    global _fast_buffer, _fast_kernel, _fast_route, _symmetric_memory_used
    group_name = parallel.process_group.group_name
    capacity = FAST_ALL_REDUCE_BYTES // dtype.itemsize  # elements

    def everyone(ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=parallel.group)
        return bool(flag.item())

    buffer = None
    if _symmetric_memory_used:
        log.info("an earlier tensor-parallel run of this process used symmetric memory: all-reduces go through NCCL")
    else:
        try:
            import torch.distributed._symmetric_memory as symm_mem

            if choice == "lamport":
                from mistral_chat.engine.kernels.lamport_all_reduce import EMPTY, buffer_slots

                buffer = symm_mem.empty(buffer_slots(parallel.world, capacity), dtype=torch.int16, device=device)
                buffer.fill_(EMPTY)
            else:
                buffer = symm_mem.empty(capacity, dtype=dtype, device=device)
        except Exception:  # noqa: BLE001 - an optional fast path: NCCL works everywhere
            log.info("symmetric memory is not available here: all-reduces go through NCCL", exc_info=True)
    if not everyone(buffer is not None):  # also: every buffer is filled before any rank writes into a peer's
        return "c10d"
    _symmetric_memory_used = True
    ok = False
    try:
        handle = symm_mem.rendezvous(buffer, group_name)
        _fast_buffer = buffer
        if choice == "lamport":
            from mistral_chat.engine.kernels.lamport_all_reduce import LamportAllReduce

            _fast_kernel = LamportAllReduce(list(handle.buffer_ptrs), parallel.rank, capacity, device)
        probe = torch.full((4096,), float(parallel.rank + 1), dtype=dtype, device=device)
        expected = parallel.world * (parallel.world + 1) / 2
        ok = bool((fast_all_reduce(probe, group_name) == expected).all())
    except Exception:  # noqa: BLE001
        log.info("symmetric-memory all-reduce failed its check: all-reduces go through NCCL", exc_info=True)
    if not everyone(ok):
        disable_fast_all_reduce()
        return "c10d"
    _fast_route = (group_name, dtype, capacity)
    log.info("tensor-parallel all-reduces up to %d KB go through symmetric memory (%s kernel)",
             FAST_ALL_REDUCE_BYTES >> 10, choice)
    return choice


def fast_all_reduce_kernel() -> str | None:
    """Which kernel carries this process's small all-reduces: "symmetric", "lamport", or None (c10d)."""
    if _fast_route is None:
        return None
    return "symmetric" if _fast_kernel is None else "lamport"


def disable_fast_all_reduce() -> None:
    """Forget the buffer (before leaving the process group)."""
    global _fast_buffer, _fast_kernel, _fast_route
    _fast_route = None
    _fast_buffer = None
    _fast_kernel = None


def embed_vocab_slice(tokens: torch.Tensor, weight: torch.Tensor, parallel: Parallel) -> torch.Tensor:
    """Embedding lookup with `weight` holding this rank's rows of the vocabulary; summed across ranks.

    Ids outside this rank's rows give zeros here and their row on the rank that holds it, so the all-reduce
    is exact (one non-zero term per token).
    """
    if not parallel.enabled:
        return F.embedding(tokens, weight)
    rows = weight.shape[0]
    local = tokens - parallel.rank * rows
    outside = (local < 0) | (local >= rows)
    h = F.embedding(local.masked_fill(outside, 0), weight)
    return all_reduce(h.masked_fill(outside.unsqueeze(-1), 0.0), parallel)
