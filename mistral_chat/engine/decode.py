"""One decode step: compiled into CUDA graphs on GPUs, or the eager step captured in CUDA graphs.

Batch-1 decode is bound by reading the weights once per token; in eager mode the CPU cannot launch the ~10 kernels per
layer fast enough to keep the GPU busy. `torch.compile(mode="reduce-overhead")` fuses the small operations and replays
the whole step as one CUDA graph. Without the compiler, `GraphedStep` captures the eager step itself (the engine's
Triton kernels) in a CUDA graph per cache bucket: on one H100, 0.8 s where compiling took 36.6 s, and 5.40 against 5.35
ms a token (the plan's decode_graphs, one GPU's default). Compiled, one transformer block is compiled once for all
layers (model.run_block_once), and the number of cache slots attention reads is a symbolic size: the position goes in as
a tensor, attention reads the cache up to a power-of-two bucket of the position, and a CUDA graph is recorded per bucket
(fast), so a graph serves every position and empty slots far beyond the conversation are not read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

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


class GraphedStep:
    """The eager decode step captured in CUDA graphs, one per (tokens' shape, cache bucket), sharing one memory pool:
    [B, 1] for decode, [1, N+1] for a speculative verify step.

    Each graph reads its tokens and the position from static tensors. Before a capture the step runs twice on a
    side stream (Triton's autotuning and lazy initialisation stay out of the graph) with the position of the call,
    so those runs write only the cache slot that the call itself then writes."""

    def __init__(self, model: Transformer, position: torch.Tensor) -> None:
        self.model = model
        self._position = position
        self._tokens: dict[torch.Size, torch.Tensor] = {}  # the graphs' token inputs, one per shape
        self._graphs = CapturedGraphs(lambda: model.slots)

    def __call__(self, tokens: torch.Tensor, position: int, key_len: int) -> torch.Tensor:
        self._position.fill_(position)
        static = self._tokens.get(tokens.shape)
        if static is None:
            static = self._tokens[tokens.shape] = torch.empty_like(tokens)
        static.copy_(tokens)
        every = tokens.shape[1] > 1  # a verify step: the logits of every position
        out = self._graphs.replay((*tokens.shape, key_len), tokens.device,
                                  lambda: self.model(static, self._position, key_len=key_len, all_logits=every))
        return out.clone() if every else out[:, -1].clone()


class CapturedGraphs:
    """CUDA graphs of one kind of step, one per key, sharing one memory pool; all dropped when the model's cache
    they read (`cache_of()`: `setup_cache` or `setup_row_cache` replaced it) is no longer the one they captured."""

    def __init__(self, cache_of: Callable[[], object]) -> None:
        self._cache_of = cache_of
        self._cache = cache_of()
        self._graphs: dict[Hashable, tuple[torch.Tensor, torch.cuda.CUDAGraph]] = {}
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self._graphs)

    def replay(self, key: Hashable, device: torch.device, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Graph `key` replayed (`run` captured first where the key is new): its output, which the next replay
        overwrites."""
        cache = self._cache_of()
        if cache is not self._cache:
            self._graphs.clear()
            self._pool = None
            self._cache = cache
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = capture(run, device, self._pool)
            self._pool = entry[1].pool()
        entry[1].replay()
        return entry[0]


def capture(run: Callable[[], torch.Tensor], device: torch.device, pool: Any = None
            ) -> tuple[torch.Tensor, torch.cuda.CUDAGraph]:
    """`run` captured in a CUDA graph (in memory pool `pool`), and the tensor it returns (the graph writes it at
    each replay). Before, `run` runs twice on a side stream, so that Triton's autotuning and lazy initialisation
    stay out of the graph; those runs must be repeatable (they write what the replay will write)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return out, graph


class GraphedRows:
    """Continuous batching's decode step, one token for every row of the batch cache (`Transformer.forward_rows`
    over all rows, engine/batch.py), captured in CUDA graphs, one per cache bucket (the plan's batch_graphs). The
    tokens and start positions go in through static tensors; rows without a sequence run token 0 at position 0."""

    def __init__(self, model: Transformer, batch: int) -> None:
        self.model = model
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.starts = torch.zeros(batch, dtype=torch.long, device=model.device)
        self._graphs = CapturedGraphs(lambda: model.row_positions)

    def __call__(self, tokens: torch.Tensor, starts: torch.Tensor, key_len: int) -> torch.Tensor:
        """Float32 logits [batch, vocab] of tokens ([batch, 1]) at starts ([batch]); `key_len`: a cache bucket."""
        self.tokens.copy_(tokens)
        self.starts.copy_(starts)
        rows = slice(0, self.tokens.shape[0])
        return self._graphs.replay(key_len, self.tokens.device,
                                   lambda: self.model.forward_rows(self.tokens, self.starts, rows, key_len)).clone()


class DecodeStep:
    """Logits for one new token per sequence, given its position. `compile` (the plan's compile_decode): compiled
    into CUDA graphs on GPUs; otherwise eager, or on one GPU where the plan's decode_graphs says so, the eager step
    captured in CUDA graphs (`GraphedStep`)."""

    def __init__(self, model: Transformer, compile: bool = True) -> None:
        self.model = model
        self.compiled = compile
        self.cuda_graphs = model.device.type == "cuda"
        self._position = torch.zeros(1, dtype=torch.long, device=model.device)
        self._carriers: dict[int, torch.Tensor] = {}  # bucket length -> empty [length, 0] tensor
        self._step = None
        self._graphed = None
        if model.plan.decode_graphs and not self.compiled and self.cuda_graphs and not model.parallel.enabled:
            self._graphed = GraphedStep(model, self._position)
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
        if self._graphed is not None:
            return self._graphed(tokens, position, key_bucket(position, self.model.slots.capacity))
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
