"""Mixture-of-experts feed-forward (Mixtral): a top-k gate and SwiGLU experts stacked in two tensors.

`w13` is [experts, 2 * hidden, dim] (w1 and w3 of each expert) and `w2` is [experts, dim, hidden]. The gate
keeps the k largest logits per token and weighs the chosen experts by a softmax over those k logits.

How the chosen experts run (`forward`): one token under tensor parallelism, through experts_gemv's kernels (which
read the expert ids on the GPU; `rows_fused` when the norms run inside the products); one token of int4 experts
in the int4 kernel's layout (the plan's `int4_experts`), through that kernel reading each chosen expert in place; a few
(token, expert) pairs, through the gathered experts' weights (int4 ones dequantized one expert at a time); a
compiled batch, every expert on every token; else (prefill) each expert on the tokens routed to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistral_chat.engine import int4
from mistral_chat.engine.kernels import experts_gemv, fused, gemv, int4_gemv
from mistral_chat.engine.materialize import materialize
from mistral_chat.engine.parallel.collectives import all_reduce, experts_all_reduce_residual
from mistral_chat.engine.parallel.sharding import Parallel
from mistral_chat.engine.plan import KernelPlan

# At or below this many (token, expert) pairs, gather the chosen experts' weights (decode);
# above it, run each expert once on all of its tokens (prefill).
GATHER_MAX_PAIRS = 8
# Above GATHER_MAX_PAIRS under torch.compile or a CUDA graph capture (batched decode, a verify step), up to this many
# tokens run every expert on every token, weighted by zero where not chosen: no data-dependent shapes, which a
# compiled block or a captured graph cannot hold.
EVERY_EXPERT_MAX_TOKENS = 64


def static_shapes(x: torch.Tensor) -> bool:
    """Whether this pass is being compiled or captured in a CUDA graph (no data-dependent shapes allowed)."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(logits, k) over the last dimension (largest first), as k rounds of argmax: under torch.compile
    these fuse into inductor's own small kernels, where torch.topk runs two library kernels of its own (sort and
    gather, ~8 us a layer of Mixtral's decode on an H200). At an exact tie the lower index wins."""
    values, indices = [], []
    for _ in range(k):
        index = logits.argmax(dim=-1, keepdim=True)
        values.append(logits.gather(-1, index))
        indices.append(index)
        logits = logits.scatter(-1, index, float("-inf"))
    return torch.cat(values, dim=-1), torch.cat(indices, dim=-1)


class Router(gemv.NoInitOnMeta, nn.Linear):
    """The gate: a plain nn.Linear (never the GEMV kernel), not initialised on meta."""


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, parallel: Parallel,
                 plan: KernelPlan | None = None) -> None:
        super().__init__()
        plan = plan or KernelPlan()
        self.top_k = top_k
        self.parallel = parallel
        self.gate = Router(dim, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w13_scale: torch.Tensor | None = None  # per-row scales when the experts are int8 (quant.py),
        self.w2_scale: torch.Tensor | None = None  # per-group scales when they are int4 (int4.py)
        self.w13_low: torch.Tensor | None = None  # int4: the groups' lows
        self.w2_low: torch.Tensor | None = None
        self.row_kernel = plan.moe == "triton"  # one row's experts through experts_gemv's kernels
        self.int4_tiled = False  # int4 experts in the int4 kernel's layout (int4.tile), one row's through it
        self.fused = plan.fused  # SwiGLU's activation in one kernel on eager paths

    def quantize_int8(self, dtype: torch.dtype) -> None:
        """Hold int8 expert weights with per-row scales (filled by the loader)."""
        for name in ("w13", "w2"):
            shape = getattr(self, name).shape
            del self._parameters[name]
            delattr(self, f"{name}_scale")
            self.register_buffer(name, torch.empty(shape, dtype=torch.int8))
            self.register_buffer(f"{name}_scale", torch.empty(shape[:2], dtype=dtype))

    def quantize_int4(self, dtype: torch.dtype, tiled: bool = False) -> bool:
        """Hold group-wise int4 expert weights (filled by the loader) where an int4 group divides both the model
        and the hidden size, else int8 ones; whether they are int4. `tiled`: in the int4 kernel's layout where both
        shapes take it."""
        (experts, rows, dim), hidden = self.w13.shape, self.w2.shape[-1]
        if int4.group_size(dim) is None or int4.group_size(hidden) is None:
            self.quantize_int8(dtype)
            return False
        self.int4_tiled = tiled and int4_gemv.tiles(rows, dim) and int4_gemv.tiles(dim, hidden)
        for name, (n, k) in (("w13", (rows, dim)), ("w2", (dim, hidden))):
            groups = k // int4.group_size(k)
            del self._parameters[name]
            delattr(self, f"{name}_scale")
            delattr(self, f"{name}_low")
            self.register_buffer(name, torch.empty(experts, n, k // 2, dtype=torch.uint8))
            self.register_buffer(f"{name}_scale", torch.empty(experts, n, groups, dtype=dtype))
            self.register_buffer(f"{name}_low", torch.empty(experts, n, groups, dtype=dtype))
        return True

    def _weight(self, name: str, index: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        """The experts `index` of w13 or w2 in `dtype`: int4 experts dequantized (only those), int8 ones
        converted (their per-row scales apply to the products' outputs: `_row_scaled`)."""
        w = getattr(self, name)[index]
        low = getattr(self, f"{name}_low")
        if low is None:
            return w.to(dtype)
        parts = (w, getattr(self, f"{name}_scale")[index], low[index])
        return int4.dequantize(*(int4.untile(*parts) if self.int4_tiled else parts), dtype)

    def _row_scaled(self, y: torch.Tensor, name: str, index: torch.Tensor | int) -> torch.Tensor:
        """y times the int8 experts' per-row scales of `name` (unchanged for float or int4 experts)."""
        scale = getattr(self, f"{name}_scale")
        if scale is None or getattr(self, f"{name}_low") is not None:
            return y
        return y * scale[index]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen experts ([N, k]) and their weights ([N, k], x's dtype) for tokens x ([N, dim])."""
        return self._choose(self.gate(x))

    def _choose(self, gate_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_logits, experts = top_k(gate_logits, self.top_k)
        return experts, F.softmax(top_logits.float(), dim=-1).to(gate_logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        experts, weights = self.route(x)
        if experts_gemv.use_experts_kernel(x, self.w13, self.row_kernel):
            act = experts_gemv.experts_swiglu(x, self.w13, experts)
            out = experts_gemv.experts_down(act, self.w2, experts, weights)
        elif self._int4_kernel_takes(x):
            out = self._int4_experts(x, experts, weights)
        elif experts.numel() <= GATHER_MAX_PAIRS:
            out = self._gathered(x, experts, weights)
        elif static_shapes(x) and x.shape[0] <= EVERY_EXPERT_MAX_TOKENS:
            out = self._every_expert(x, experts, weights)
        else:
            out = self._grouped(x, experts, weights)
        return all_reduce(out.reshape(shape), self.parallel)

    def rows_fused(self, weighted: torch.Tensor, h: torch.Tensor, eps: float,
                   next_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h + this layer of RMSNorm(h) (weighted: h times the norm's weight, one row), and that times next_norm:
        the gate's and w13's products compute the norm's scale themselves, the residual add and next_norm are in
        the all-reduce (Transformer.rows_fused; experts_gemv's kernels carry the experts, w2's pushing its
        outputs into the Lamport buffers where that kernel carries the all-reduces)."""
        experts, weights = self._choose(gemv.linear_row(weighted, self.gate.weight, norm_of=h, eps=eps))
        act = experts_gemv.experts_swiglu(weighted, self.w13, experts, norm_of=h, eps=eps)
        return experts_all_reduce_residual(act, self.w2, experts, weights, h, next_norm, self.parallel)

    def _int4_kernel_takes(self, x: torch.Tensor) -> bool:
        """One row, and int4 experts in the kernel's layout."""
        return self.int4_tiled and x.numel() == x.shape[-1]

    def _int4_experts(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`_gathered`'s products and roundings for one row, each chosen int4 expert read in place by the kernel
        (no dequantized copy: full Mixtral int4 decodes in the memory of its weights)."""
        ids = experts.reshape(-1)
        act = int4_gemv.int4_experts(x, self.w13, self.w13_scale, self.w13_low, ids, swiglu=True)  # [k, hidden]
        y = int4_gemv.int4_experts(act, self.w2, self.w2_scale, self.w2_low, ids)  # [k, dim]
        return torch.einsum("nkd,nk->nd", y.unsqueeze(0), weights)

    def _gathered(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Read only the chosen experts' weights: best for a handful of tokens."""
        if self.w13_low is not None:
            return self._gathered_int4(x, experts, weights)
        w13 = self._weight("w13", experts, x.dtype)  # [N, k, 2H, D]
        w2 = self._weight("w2", experts, x.dtype)  # [N, k, D, H]
        h = self._row_scaled(torch.einsum("nd,nkhd->nkh", x, w13), "w13", experts)
        y = torch.einsum("nkh,nkdh->nkd", materialize(fused.silu_and_mul(h, self.fused)), w2)
        y = self._row_scaled(y, "w2", experts)
        return torch.einsum("nkd,nk->nd", y, weights)

    def _gathered_int4(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`_gathered` for int4 experts, each chosen expert dequantized on its own (a Mixtral pair's bf16 copies
        at once took ~0.7 GB above the weights); the expert ids stay on the device (1-element index tensors: no
        host sync, so CUDA graphs capture it)."""
        pairs = range(experts.shape[1])
        return torch.cat([sum(self._expert(x[t:t + 1], experts[t, s:s + 1]) * weights[t, s] for s in pairs)
                          for t in range(x.shape[0])])

    def _every_expert(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each expert on every token, weighted by its routing weight (zero where not chosen): the same weights read
        as `_grouped` reads once every expert has a token, without its data-dependent shapes (compiled batched
        decode)."""
        out = torch.zeros_like(x)
        for e in range(self.w13.shape[0]):
            coef = (weights * (experts == e)).sum(dim=-1, keepdim=True)  # [N, 1]
            out = out + self._expert(x, e) * coef
        return out

    def _expert(self, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU feed-forward of the rows x (e: an index, or a 1-element index tensor on the device)."""
        h = self._row_scaled(F.linear(x, self._weight("w13", e, x.dtype).flatten(0, -2)), "w13", e)
        y = F.linear(fused.silu_and_mul(h, self.fused), self._weight("w2", e, x.dtype).flatten(0, -2))
        return self._row_scaled(y, "w2", e)

    def _grouped(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Run each expert once on the tokens routed to it: best for prefill."""
        out = torch.zeros_like(x)
        for e in range(self.w13.shape[0]):
            token_idx, slot = torch.where(experts == e)
            if token_idx.numel() == 0:
                continue
            y = self._expert(x[token_idx], e) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out
