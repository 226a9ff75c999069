"""Mixtral's chosen experts for one token (batch-1 decode), as two Triton kernels that read the expert ids on the GPU.

In decode the MoE layer multiplies one row by the k experts its gate picked. Here each program reads the expert id
itself and streams that expert's rows in place, as gemv.py's kernel streams a matrix:

- `experts_swiglu(x, w13, experts)`: SiLU(gate) * up of each chosen expert's w13 ([k, hidden]), one program per
  block of outputs and expert;
- `experts_down(act, w2, experts, weights)`: sum over the chosen experts of weight * (w2[e] @ act[slot]) ([dim]),
  each program summing its block of outputs over the k experts, each expert's product rounded to x's dtype first,
  as MoEFeedForward's gathered formula rounds.

`experts_down_to_peers` is `experts_down` pushing its outputs into the Lamport all-reduce's buffers (under `--tp`,
as gemv.linear_row_to_peers does for dense products).

MoEFeedForward uses them for one row of float (not int8) experts where the plan's `moe` is "triton" (under tensor
parallelism; one GPU keeps inductor's products, which read whole experts at about the copy bandwidth; figures in
docs/engine.md). The tests run them on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from mistral_chat.engine.kernels.fused import AUTOTUNE_CACHE, kernel_op, pdl
from mistral_chat.engine.kernels.gemv import send_config

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton
    triton = None


if triton is not None:
    from mistral_chat.engine.kernels.fused import start_next, wait_previous
    from mistral_chat.engine.kernels.gemv import _CONFIGS, _norm_scale, _row_sums, _store_rows, _sums_done

    @triton.autotune(configs=_CONFIGS, key=["N", "K", "PARTS", "SLOTS"], **AUTOTUNE_CACHE)
    @triton.jit
    def _experts_kernel(x_ptr, w_ptr, out_ptr, experts_ptr, weights_ptr, N, K, stride_x, stride_we, stride_wn, UP,
                        norm_ptr, eps, buffers_ptr, counters_ptr, capacity, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PARTS: tl.constexpr, SLOTS: tl.constexpr, SUM: tl.constexpr,
                        NORM: tl.constexpr, SEND: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                        SEND_BLOCK: tl.constexpr, PDL: tl.constexpr):
        """For expert slot s (expert e = experts[s], x row x_ptr + s * stride_x), sums[n] = w[e, n, :] . x.

        SUM=False (w13, PARTS=2: gate rows, then up rows from row UP): program (block, s) stores
        SiLU(gate) * up of its outputs at out_ptr + s * N. SUM=True (w2, PARTS=1): program (block, 0) stores
        sum over the SLOTS slots of weights[s] * sums (each rounded to out's dtype first).
        NORM: the sums are scaled by 1 / rms(h) of h at norm_ptr ([K]) first, as in gemv._gemv_kernel.
        SEND (SUM, bf16): the sums are pushed into every rank's Lamport all-reduce buffer instead of stored, as
        gemv._gemv_kernel's SEND does (see `experts_down_to_peers`)."""
        start_next(PDL)
        wait_previous(PDL)  # the expert ids (and x) come from the kernels before
        scale = _norm_scale(norm_ptr, K, eps, BLOCK_K, NORM, 0)
        r = tl.arange(0, BLOCK_N * PARTS)
        units = tl.program_id(0) * BLOCK_N + r // PARTS
        rows = units + (r % PARTS) * UP
        row_ok = units[:, None] < N
        cols = tl.arange(0, BLOCK_K)
        dtype = out_ptr.dtype.element_ty
        total = tl.zeros((BLOCK_N * PARTS,), dtype=tl.float32)
        for i in tl.static_range(SLOTS if SUM else 1):
            slot = i if SUM else tl.program_id(1)
            expert = tl.load(experts_ptr + slot).to(tl.int64)
            w_rows = w_ptr + expert * stride_we + rows[:, None] * stride_wn
            x_row = x_ptr + slot * stride_x
            w = tl.load(w_rows + cols[None, :], mask=row_ok & (cols[None, :] < K), other=0.0)
            sums = _row_sums(w, w_rows, row_ok, x_row, K, BLOCK_N * PARTS, BLOCK_K) * scale
            if SUM:
                total += sums.to(dtype).to(tl.float32) * tl.load(weights_ptr + slot).to(tl.float32)
            else:
                _store_rows(out_ptr + slot * N, sums, tl.program_id(0) * BLOCK_N, N, BLOCK_N, PARTS)
        if SUM:
            _sums_done(total, out_ptr, N, buffers_ptr, counters_ptr, capacity, BLOCK_N, PARTS, SEND, RANK, WORLD,
                       SEND_BLOCK)


def use_experts_kernel(x: torch.Tensor, w13: torch.Tensor, planned: bool) -> bool:
    """Whether a MoE layer's products for x go to these kernels: the plan says so (its `moe`), one row, float
    experts (not int8)."""
    return planned and x.numel() == x.shape[-1] and w13.is_floating_point()


@kernel_op("mistral_chat::experts_swiglu")
def experts_swiglu(x: torch.Tensor, w13: torch.Tensor, experts: torch.Tensor, norm_of: torch.Tensor | None = None,
                   eps: float = 0.0) -> torch.Tensor:
    """SiLU(gate) * up of x ([..., dim], one row) through each chosen expert's w13 ([experts, 2 * hidden, dim],
    gate rows then up rows): [k, hidden] for `experts` ([..., k], the ids). With `norm_of` (h, [dim]), the sums are
    divided by rms(h) first: RMSNorm(h)'s products when x = h * the norm's weight (as gemv.linear_row's)."""
    assert triton is not None, "experts_swiglu needs Triton"
    slots, (_, rows, dim) = experts.numel(), w13.shape
    out = torch.empty(slots, rows // 2, dtype=x.dtype, device=x.device)
    x_row = x.reshape(dim).contiguous()
    h_row = x_row if norm_of is None else norm_of.reshape(dim).contiguous()

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(rows // 2, meta["BLOCK_N"]), slots)

    _experts_kernel[grid](x_row, w13, out, experts.reshape(slots).contiguous(), x_row, rows // 2, dim, 0,
                          w13.stride(0), w13.stride(1), rows // 2, h_row, eps, out, out, 0, PARTS=2, SLOTS=slots,
                          SUM=False, NORM=norm_of is not None, SEND=False, RANK=0, WORLD=1, SEND_BLOCK=1, **pdl(x))
    return out


@experts_swiglu.register_fake
def _(x: torch.Tensor, w13: torch.Tensor, experts: torch.Tensor, norm_of: torch.Tensor | None = None,
      eps: float = 0.0) -> torch.Tensor:
    return x.new_empty(experts.numel(), w13.shape[1] // 2)


@kernel_op("mistral_chat::experts_down")
def experts_down(act: torch.Tensor, w2: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over the chosen experts of weights[s] * (w2[experts[s]] @ act[s]): act [k, hidden], w2 [experts, dim,
    hidden], experts and weights [..., k]; [dim]."""
    assert triton is not None, "experts_down needs Triton"
    slots, (_, dim, hidden) = experts.numel(), w2.shape
    out = torch.empty(dim, dtype=act.dtype, device=act.device)
    act = act.contiguous()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(dim, meta["BLOCK_N"]),)

    _experts_kernel[grid](act, w2, out, experts.reshape(slots).contiguous(), weights.reshape(slots).contiguous(),
                          dim, hidden, act.stride(0), w2.stride(0), w2.stride(1), dim, act, 0.0, out, out, 0,
                          PARTS=1, SLOTS=slots, SUM=True, NORM=False, SEND=False, RANK=0, WORLD=1, SEND_BLOCK=1,
                          **pdl(act))
    return out


def experts_down_to_peers(act: torch.Tensor, w2: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                          lamport) -> None:
    """`experts_down` (bf16), its outputs pushed straight into every rank's buffer of `lamport` (a
    LamportAllReduce) for `lamport.receive` to sum, as gemv.linear_row_to_peers pushes a dense product's."""
    assert triton is not None, "experts_down_to_peers needs Triton"
    slots, (_, dim, hidden) = experts.numel(), w2.shape
    assert act.dtype == w2.dtype == torch.bfloat16 and dim <= lamport.capacity
    act, experts, weights = act.contiguous(), experts.reshape(slots).contiguous(), weights.reshape(slots).contiguous()
    config = send_config(_experts_kernel, (dim, hidden, slots, w2.stride(0), w2.stride(1)),
                         lambda: experts_down(act, w2, experts, weights))
    _experts_kernel.fn[(triton.cdiv(dim, config.kwargs["BLOCK_N"]),)](
        act, w2, act, experts, weights, dim, hidden, act.stride(0), w2.stride(0), w2.stride(1), dim, act, 0.0,
        lamport.addresses, lamport.counters, lamport.capacity, PARTS=1, SLOTS=slots, SUM=True, NORM=False,
        SEND=True, RANK=lamport.rank, WORLD=lamport.world, SEND_BLOCK=lamport.block, **config.all_kwargs(),
        **pdl(act))


@experts_down.register_fake
def _(act: torch.Tensor, w2: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return act.new_empty(w2.shape[1])
