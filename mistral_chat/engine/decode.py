"""One decode step, compiled into CUDA graphs on GPUs.

Batch-1 decode is bound by reading the weights once per token; in eager mode the CPU cannot launch the
~10 kernels per layer fast enough to keep the GPU busy. `torch.compile(mode="reduce-overhead")` fuses the small
operations and replays the whole step as one CUDA graph. One transformer block is compiled once for all layers
(model.run_block_once), and the number of cache slots attention reads is a symbolic size: the position goes in as
a tensor, attention reads the cache up to a power-of-two bucket of the position, and a CUDA graph is recorded per
bucket (fast), so a graph serves every position and empty slots far beyond the conversation are not read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mistral_chat.engine.model import Transformer

log = logging.getLogger(__name__)

MIN_BUCKET = 256


def key_bucket(position: int, capacity: int) -> int:
    """Cache slots a query at `position` must read, rounded up to a power of two (at most the capacity)."""
    needed = position + 1
    if needed >= capacity:
        return capacity
    bucket = MIN_BUCKET
    while bucket < needed:
        bucket *= 2
    return min(bucket, capacity)


def use_compile_cache(cache_dir: Path) -> None:
    """Keep inductor's compiled kernels between runs, so that later start-ups skip most compilation."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def _decode(model: Transformer, tokens: torch.Tensor, position: torch.Tensor,
            key_len_carrier: torch.Tensor) -> torch.Tensor:
    """`key_len` travels as the (dynamic) length of an empty tensor, so that one graph serves every bucket."""
    return model(tokens, position, key_len=key_len_carrier.shape[0], block_regions=True)


class DecodeStep:
    """Logits for one new token per sequence, given its position; compiled (`compile`, the plan's compile_decode)
    into CUDA graphs on GPUs, or eager."""

    def __init__(self, model: Transformer, compile: bool = True) -> None:
        self.model = model
        self.compiled = compile
        self.cuda_graphs = model.device.type == "cuda"
        self._position = torch.zeros(1, dtype=torch.long, device=model.device)
        self._carriers: dict[int, torch.Tensor] = {}  # bucket length -> empty [length, 0] tensor
        self._step = None
        if self.compiled:
            import torch._dynamo.config as dynamo_config
            import torch._inductor.config as inductor_config

            # one graph per (cache bucket, batch size), and a new set for each model loaded in this process
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
            if self.cuda_graphs:  # batch-1 products as tuned Triton reductions (materialize.py keeps their inputs)
                inductor_config.coordinate_descent_tuning = True
            mode = "reduce-overhead" if self.cuda_graphs else "default"
            self._step = torch.compile(_decode, mode=mode, fullgraph=True, dynamic=None)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """tokens: [B, 1] on the model's device; returns float32 logits [B, vocab] (a fresh tensor)."""
        assert self.model.slots is not None
        if self._step is None:
            return self.model(tokens, position)[:, -1]
        self._position.fill_(position)
        carrier = self._carrier(key_bucket(position, self.model.slots.capacity))
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._step(self.model, tokens, self._position, carrier)[:, -1].clone()

    def _carrier(self, key_len: int) -> torch.Tensor:
        carrier = self._carriers.get(key_len)
        if carrier is None:
            carrier = torch.empty(key_len, 0, device=self.model.device)
            torch._dynamo.maybe_mark_dynamic(carrier, 0)  # the whole-cache bucket may specialize
            self._carriers[key_len] = carrier
        return carrier


@torch.no_grad()
def prefill(model: Transformer, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Logits ([B, vocab]) of the last position of a prompt chunk, eagerly: compiling prefill gained little per
    prompt and cost its compile before every start's first answer (docs/engine.md)."""
    return model(tokens, start_pos)[:, -1]
