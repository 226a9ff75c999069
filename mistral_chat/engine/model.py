"""The Mistral / Mixtral transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU or MoE feed-forward.

Weights use mistral-inference's layout (interleaved RoPE pairs), with q/k/v and gate/up projections fused:
`attention.wqkv` is [wq; wk; wv] and `feed_forward.w13` is [w1; w3] (see weights.py).
With tensor parallelism each rank holds its slice of heads and hidden units, and `group` names the process
group whose sum completes the row-parallel projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistral_chat.engine.kernels import decode_attention, fused
from mistral_chat.engine.cache import LayerKVCache, RowPositions, SlotPositions, cache_capacity
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.kernels.gemv import Linear, NoInitOnMeta
from mistral_chat.engine.materialize import materialize
from mistral_chat.engine.moe import MoEFeedForward
from mistral_chat.engine.parallel.collectives import (all_reduce, embed_vocab_slice, gather_vocab,
                                                      linear_all_reduce_residual)
from mistral_chat.engine.parallel.sharding import Parallel
from mistral_chat.engine.plan import KernelPlan


@dataclass(frozen=True)
class LocalShape:
    """The sizes one rank holds."""

    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int

    @classmethod
    def of(cls, config: ModelConfig, parallel: Parallel) -> "LocalShape":
        return cls(
            n_heads=config.n_heads // parallel.world,
            n_kv_heads=parallel.local_kv_heads(config.n_kv_heads),
            hidden_dim=config.hidden_dim // parallel.world,
            vocab_size=config.vocab_size // parallel.world,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernel: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.kernel = kernel  # the plan's `fused`: one Triton kernel on eager paths
        self.weight = nn.Parameter(torch.ones(dim))

    def _kernel_runs(self) -> bool:
        return self.kernel and not torch.compiler.is_compiling()  # compiled, inductor fuses the formula itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_runs():
            return fused.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x + delta, and its norm: one kernel in eager mode on GPUs (under torch.compile inductor fuses them)."""
        if self._kernel_runs() and x.shape == delta.shape:
            return fused.add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


def rope_tables(head_dim: int, max_positions: int, theta: float, device: torch.device) -> torch.Tensor:
    """[max_positions, head_dim // 2, 2] float32 table of (cos, sin)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, kernel: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs of x ([B, T, H, D]) by rope ([T, D/2, 2]); `kernel`: in one Triton kernel where
    it fits (eager only)."""
    if kernel and not torch.compiler.is_compiling() and fused.rope_fits(x):
        return fused.rope(x, rope)
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def apply_rope_rows(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with each row at its own positions: x [B, T, H, D], rope [B, T, D/2, 2] (plain PyTorch)."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


# Up to this many query tokens, attention runs as two batched products per KV head (decode); beyond, SDPA.
GROUPED_ATTENTION_MAX_QUERIES = 16


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q ([B, H, T, D]) over k, v ([B, Hkv, S, D]) under mask ([T, S]); each KV head serves its
    group of query heads directly instead of being copied for each of them. Softmax in float32."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    scores = torch.matmul(q.reshape(b, hkv, g * t, d), k.transpose(-1, -2)) * d ** -0.5
    scores = scores.view(b, hkv, g, t, s).float().masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(b, hkv, g * t, s)
    return torch.matmul(probs, v).view(b, h, t, d)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, local: LocalShape, parallel: Parallel, plan: KernelPlan) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.n_heads = local.n_heads
        self.n_kv_heads = local.n_kv_heads
        self.parallel = parallel
        self.plan = plan
        self.rope_kernel = plan.fused and fused.rope_and_cache_fits(config.head_dim)  # one kernel: RoPE, cache writes
        qkv_rows = (local.n_heads + 2 * local.n_kv_heads) * config.head_dim
        self.wqkv = Linear(config.dim, qkv_rows, bias=False)
        self.wo = Linear(local.n_heads * config.head_dim, config.dim, bias=False)
        self.cache: LayerKVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor | None,
                key_len: int) -> torch.Tensor:
        return all_reduce(self.wo(self.attend(x, rope, slots, mask, key_len)), self.parallel)

    def attend(self, x: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor | None,
               key_len: int, norm_of: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
        """The heads' outputs ([B, T, n_heads * head_dim]) before `wo`. `norm_of`: x is norm_of * the norm's
        weight, and the q/k/v product computes the norm's scale itself (Transformer.rows_fused)."""
        b, t, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = self.wqkv(x) if norm_of is None else self.wqkv.normed(x, norm_of, eps)
        assert self.cache is not None, "call Transformer.setup_cache first"
        # RoPE and the cache writes in one kernel. Compiled, only where the decode attention kernel, which takes the
        # q it returns, is the caches' one reader (the op does not declare its writes: see fused.rope_and_cache)
        decode_kernel = mask is not None and t <= GROUPED_ATTENTION_MAX_QUERIES and self.plan.attention == "triton"
        if self.rope_kernel and (decode_kernel or not torch.compiler.is_compiling()):
            q = fused.rope_and_cache(qkv, rope, slots, self.cache.k, self.cache.v, self.n_heads).transpose(1, 2)
            keys, values = self.cache.k, self.cache.v
            if mask is None:  # a first chunk: its keys and values are the cache's first t slots
                k, v = keys[:, :, :t], values[:, :, :t]
        else:
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = apply_rope(q.view(b, t, self.n_heads, self.head_dim), rope, self.plan.fused).transpose(1, 2)
            k = apply_rope(k.view(b, t, self.n_kv_heads, self.head_dim), rope, self.plan.fused).transpose(1, 2)
            v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            keys, values = self.cache.update(slots, k, v)
        gqa = self.n_heads != self.n_kv_heads
        if mask is None:  # a first chunk within the window: plain causal attention (flash kernels)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif t <= GROUPED_ATTENTION_MAX_QUERIES:  # decode: no copy of K/V per query head
            attend = decode_attention.decode_attention if decode_kernel else grouped_attention
            out = attend(q, keys[:, :, :key_len], values[:, :, :key_len], mask[:, :key_len])
        else:
            group = self.n_heads // self.n_kv_heads
            keys = keys[:, :, :key_len].repeat_interleave(group, dim=1)
            values = values[:, :, :key_len].repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, :key_len])
        return out.transpose(1, 2).reshape(b, t, q_size)

    def forward_rows(self, x: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                     key_len: int, rows: slice, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` for the batch rows `rows` of the cache, each at its own positions (continuous batching):
        rope [N, T, D/2, 2], slots [N, T], mask [N, T, capacity]. Plain PyTorch products; where the plan has
        them, RoPE with the cache writes and decode's attention in the kernels, with a table, slots and mask per
        row (and each row's visible length: `lengths`, for the decode attention kernel)."""
        b, t, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        assert self.cache is not None, "call Transformer.setup_row_cache first"
        qkv = self.wqkv(x)
        if self.rope_kernel:  # RoPE and the cache writes in one kernel, each row with its own positions
            keys, values = self.cache.k[rows], self.cache.v[rows]
            q = fused.rope_and_cache(qkv, rope, slots, keys, values, self.n_heads).transpose(1, 2)
        else:
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = apply_rope_rows(q.view(b, t, self.n_heads, self.head_dim), rope).transpose(1, 2)
            k = apply_rope_rows(k.view(b, t, self.n_kv_heads, self.head_dim), rope).transpose(1, 2)
            v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            keys, values = self.cache.update_rows(rows, slots, k, v)
        keys, values, mask = keys[:, :, :key_len], values[:, :, :key_len], mask[..., :key_len]
        if t <= GROUPED_ATTENTION_MAX_QUERIES and self.plan.attention == "triton":  # decode: a mask per row
            out = decode_attention.decode_attention(q, keys, values, mask, lengths)
        elif t <= GROUPED_ATTENTION_MAX_QUERIES:
            out = grouped_attention(q, keys, values, mask[:, None, None])
        else:
            group = self.n_heads // self.n_kv_heads
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
        return all_reduce(self.wo(out.transpose(1, 2).reshape(b, t, q_size)), self.parallel)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into w13."""

    def __init__(self, dim: int, hidden_dim: int, parallel: Parallel) -> None:
        super().__init__()
        self.parallel = parallel
        self.w13 = Linear(dim, 2 * hidden_dim, bias=False)  # the plan's choices are set by Transformer
        self.w2 = Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.w2(self.w13.swiglu(x)), self.parallel)

    def rows_fused(self, weighted: torch.Tensor, h: torch.Tensor, eps: float,
                   next_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h + this feed-forward of RMSNorm(h) (weighted: h times the norm's weight), and that times next_norm:
        the norm inside w13's product, the residual add inside w2's all-reduce (Transformer.rows_fused)."""
        act = self.w13.swiglu(weighted, h, eps)
        return linear_all_reduce_residual(act, self.w2, h, next_norm, self.parallel)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, local: LocalShape, parallel: Parallel, plan: KernelPlan) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, plan.fused)
        self.attention = Attention(config, local, parallel, plan)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, plan.fused)
        self.feed_forward: nn.Module
        if config.is_moe:
            self.feed_forward = MoEFeedForward(config.dim, local.hidden_dim, config.num_experts,
                                               config.num_experts_per_tok, parallel, plan)
        else:
            self.feed_forward = FeedForward(config.dim, local.hidden_dim, parallel)

    def forward(self, x: torch.Tensor, delta: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor,
                mask: torch.Tensor | None, key_len: int,
                next_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after attention, and the feed-forward's output, for input x + delta.

        The last residual add (of the feed-forward's output) is left to the next block (or the final norm), so
        that under torch.compile it shares a kernel with the norm that reads it even when each block is its own
        compiled region (quick compile): one kernel a layer fewer in decode.

        With `next_norm` (Transformer.rows_fused): x is the residual stream, delta is x * attention_norm's weight,
        and the result is the stream after this block and it times next_norm (the next block's attention_norm
        weight, or the final norm's)."""
        if next_norm is not None:
            return self._rows_fused(x, delta, rope, slots, mask, key_len, next_norm)
        x, normed = self.attention_norm.add_and_norm(x, delta)
        h, normed = self.ffn_norm.add_and_norm(x, self.attention(materialize(normed), rope, slots, mask, key_len))
        return h, self.feed_forward(materialize(normed))

    def _rows_fused(self, h: torch.Tensor, weighted: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor,
                    mask: torch.Tensor | None, key_len: int,
                    next_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each norm inside the product that reads it, each residual add inside the all-reduce before it."""
        attention, feed_forward = self.attention, self.feed_forward
        heads = attention.attend(weighted, rope, slots, mask, key_len, norm_of=h, eps=self.attention_norm.eps)
        h, weighted = linear_all_reduce_residual(heads, attention.wo, h, self.ffn_norm.weight, attention.parallel)
        return feed_forward.rows_fused(weighted, h, self.ffn_norm.eps, next_norm)

    def forward_rows(self, x: torch.Tensor, delta: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor,
                     mask: torch.Tensor, key_len: int, rows: slice,
                     lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for batch rows at positions of their own (Transformer.forward_rows)."""
        x, normed = self.attention_norm.add_and_norm(x, delta)
        h, normed = self.ffn_norm.add_and_norm(x, self.attention.forward_rows(normed, rope, slots, mask, key_len,
                                                                               rows, lengths))
        return h, self.feed_forward(normed)


def run_block(layer: TransformerBlock, h: torch.Tensor, delta: torch.Tensor, rope: torch.Tensor,
              slots: torch.Tensor, mask: torch.Tensor | None, key_len: int,
              next_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return layer(h, delta, rope, slots, mask, key_len, next_norm)


# The same call marked as one region that torch.compile traces and compiles once for all layers (they share code
# and shapes): a 32-layer decode graph compiles in seconds instead of minutes (7x faster on the CPU). Not for
# prefill: compiled with dynamic=True (every size and scalar symbolic), such regions fail on torch 2.11 and 2.13.
_nested_region = getattr(torch.compiler, "nested_compile_region", None)
run_block_once = run_block if _nested_region is None else _nested_region(run_block)


class Embedding(NoInitOnMeta, nn.Embedding):
    """nn.Embedding, not initialised on meta."""


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Parallel | None = None, plan: KernelPlan | None = None) -> None:
        super().__init__()
        self.config = config
        self.parallel = parallel or Parallel()
        self.plan = plan or KernelPlan()  # plain PyTorch unless the loader chose kernels (plan.py)
        if self.plan.norms_in_products and config.is_moe and self.plan.moe != "triton":
            raise ValueError("plan norms_in_products needs moe=triton for a mixture-of-experts model")
        local = LocalShape.of(config, self.parallel)
        self.tok_embeddings = Embedding(local.vocab_size, config.dim)  # this rank's rows of the vocabulary
        self.layers = nn.ModuleList(TransformerBlock(config, local, self.parallel, self.plan)
                                    for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, self.plan.fused)
        self.output = Linear(config.dim, local.vocab_size, bias=False)
        self.output.float_out = True
        self.slots: SlotPositions | None = None
        self.row_positions: RowPositions | None = None  # per-row positions (setup_row_cache)
        self.rope: torch.Tensor | None = None
        for module in self.modules():
            if isinstance(module, Linear):
                module.row_kernel = self.plan.gemv == "triton"
                module.fused = self.plan.fused

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def rows_fused(self, h: torch.Tensor) -> bool:
        """Whether this forward pass runs each RMSNorm inside the product that reads it (its programs compute the
        norm's scale from the residual stream; gemv.linear_row's norm_of) and each residual add inside the
        all-reduce before it (collectives.all_reduce_residual): two kernels a layer fewer. For one row (batch-1
        decode) where the plan says so (under tensor parallelism, the GEMV kernels carrying the products)."""
        return self.plan.norms_in_products and h.numel() == h.shape[-1]

    @property
    def cache_capacity(self) -> int:
        return 0 if self.slots is None else self.slots.capacity

    def setup_cache(self, max_positions: int, batch: int = 1, prefill_chunk: int = 2048) -> None:
        """Allocate the KV cache for sequences of up to `max_positions` tokens.

        With a sliding window shorter than that, the buffer holds only window + one prefill chunk, and wraps;
        with per-layer windows the longest decides, and a full-attention layer means no wrap.
        """
        window = self.config.sliding_window
        capacity, wraps = cache_capacity(max_positions, window, prefill_chunk)
        local_kv = self.layers[0].attention.n_kv_heads
        for layer in self.layers:
            layer.attention.cache = LayerKVCache(batch, local_kv, capacity, self.config.head_dim,
                                                 self.dtype, self.device)
        self.slots = SlotPositions(capacity, window, self.device, wraps=wraps)
        self.row_positions = None
        self.rope = rope_tables(self.config.head_dim, max_positions, self.config.rope_theta, self.device)

    def setup_row_cache(self, max_positions: int, batch: int, prefill_chunk: int = 2048) -> None:
        """`setup_cache` for `batch` rows that each hold a sequence of their own (continuous batching: see
        `forward_rows` and engine/batch.py)."""
        self.setup_cache(max_positions, batch, prefill_chunk)
        assert self.slots is not None
        self.row_positions = RowPositions(batch, self.slots.capacity, self.slots.sliding_window, self.device,
                                          wraps=self.slots.wraps)

    @torch.no_grad()
    def forward_rows(self, tokens: torch.Tensor, start_pos: torch.Tensor, rows: slice, key_len: int) -> torch.Tensor:
        """Float32 logits ([N, vocab]) of the last of `tokens` ([N, T]) in each of the cache's batch rows `rows`,
        row n's tokens placed at positions start_pos[n]... (start_pos: [N] on the model's device).

        Each row keeps its own positions and mask (`setup_row_cache`), so sequences of different lengths share
        a step: one new token for every row (decode), or one row's prompt chunk (prefill). `key_len`: how many
        cache slots attention reads (at least the longest row's positions, at most the capacity). Eager, or
        captured in CUDA graphs (decode.GraphedRows). Under tensor parallelism every rank makes the same call on
        its shard (its collectives sum the row-parallel products and gather the vocabulary: parallel/batch.py).
        """
        assert self.row_positions is not None and self.rope is not None, "call setup_row_cache first"
        t = tokens.shape[1]
        if t > self.row_positions.max_chunk:
            raise ValueError(f"chunk of {t} tokens exceeds the cache's {self.row_positions.max_chunk}")
        positions = start_pos[:, None] + torch.arange(t, device=tokens.device)
        slots = self.row_positions.record(positions, rows)
        windows = self.config.attention_windows
        masks = {w: self.row_positions.mask(positions, rows, window=w) for w in dict.fromkeys(windows)}
        # decode steps in the attention kernel read each row only up to its last visible key
        kernel = t <= GROUPED_ATTENTION_MAX_QUERIES and self.plan.attention == "triton"
        lengths = {w: decode_attention.visible_lengths(m[..., :key_len]) if kernel else None for w, m in masks.items()}
        rope = self.rope[positions]
        h = self.tok_embeddings(tokens) if not self.parallel.enabled else \
            embed_vocab_slice(tokens, self.tok_embeddings.weight, self.parallel)
        delta = torch.zeros_like(h)
        for layer, window in zip(self.layers, windows):
            h, delta = layer.forward_rows(h, delta, rope, slots, masks[window], key_len, rows, lengths[window])
        h, delta = h[:, -1:], delta[:, -1:]
        return gather_vocab(self.output(self.norm.add_and_norm(h, delta)[1]).float()[:, -1], self.parallel)

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, all_logits: bool = False,
                key_len: int | None = None, block_regions: bool = False) -> torch.Tensor:
        """Logits ([B, T or 1, vocab], float32) for `tokens` ([B, T]) placed at positions start_pos...

        `start_pos` may be a 1-element tensor (compiled decode, so that the graph does not change with the
        position); then `key_len`, how many cache slots attention reads, must be given. `block_regions`: under
        torch.compile (decode), compile one block for all layers (see `run_block_once`).
        """
        assert self.slots is not None and self.rope is not None, "call setup_cache first"
        t = tokens.shape[1]
        if t > self.slots.max_chunk:
            raise ValueError(f"chunk of {t} tokens exceeds the cache's {self.slots.max_chunk}")
        if isinstance(start_pos, int):
            positions = torch.arange(start_pos, start_pos + t, device=tokens.device)
            key_len = key_len or min(self.slots.capacity, start_pos + t)  # before a wrap, later slots are empty
        else:
            positions = start_pos + torch.arange(t, device=tokens.device)
            assert key_len is not None, "key_len is needed with a tensor start_pos"
        slots = self.slots.record(positions)
        first_chunk = isinstance(start_pos, int) and start_pos == 0
        windows = self.config.attention_windows
        masks = {  # one mask per distinct window; None: a first chunk within it, plain causal attention
            w: None if first_chunk and (w is None or t <= w) else self.slots.mask(positions, window=w)
            for w in dict.fromkeys(windows)
        }
        rope = self.rope[positions]
        h = self.tok_embeddings(tokens) if not self.parallel.enabled else \
            embed_vocab_slice(tokens, self.tok_embeddings.weight, self.parallel)
        block = run_block_once if block_regions else run_block
        if self.rows_fused(h):
            norms = [layer.attention_norm.weight for layer in self.layers] + [self.norm.weight]
            weighted = h * norms[0]
            for layer, window, next_norm in zip(self.layers, windows, norms[1:]):
                h, weighted = block(layer, h, weighted, rope, slots, masks[window], key_len, next_norm)
            return gather_vocab(self.output.normed(weighted, h, self.norm.eps).float(), self.parallel)
        delta = torch.zeros_like(h)
        for layer, window in zip(self.layers, windows):
            h, delta = block(layer, h, delta, rope, slots, masks[window], key_len)
        if not all_logits:
            h, delta = h[:, -1:], delta[:, -1:]
        logits = self.output(self.norm.add_and_norm(h, delta)[1]).float()
        return gather_vocab(logits, self.parallel)
