"""One decode step, optionally compiled into a CUDA graph.

Batch-1 decode is bound by reading the weights once per token; in eager mode the CPU cannot launch the
~10 kernels per layer fast enough to keep the GPU busy. `torch.compile(mode="reduce-overhead")` fuses the small
operations and replays the whole step as one CUDA graph. The graph needs fixed shapes, so the position goes in
as a tensor and attention reads the cache up to a power-of-two bucket of the position (a few graphs in all,
instead of one per position, and no reading of empty cache slots far beyond the conversation).
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


def quick_compile() -> bool:
    """Whether decode compiles one transformer block for all layers, and one graph for all cache buckets (the
    bucket length is a symbolic size; CUDA graphs are still recorded per bucket, which is fast). The default;
    MISTRAL_CHAT_QUICK_COMPILE=0 compiles the whole model into one graph per bucket instead.

    On an H100 (Mistral-7B bf16, BENCHMARKS.md) it compiles in 48 s instead of 67 s and decodes as fast (5.97
    against 6.11 ms/token); on the CPU it compiles a 32-layer model about 7x faster, with the same tokens
    (tests/test_compiled_decode.py)."""
    return os.environ.get("MISTRAL_CHAT_QUICK_COMPILE", "1") == "1"


def _decode(model: Transformer, tokens: torch.Tensor, position: torch.Tensor, key_len: int) -> torch.Tensor:
    return model(tokens, position, key_len=key_len)


def _decode_any_length(model: Transformer, tokens: torch.Tensor, position: torch.Tensor,
                       key_len_carrier: torch.Tensor) -> torch.Tensor:
    """`key_len` travels as the (dynamic) length of an empty tensor, so that one graph serves every bucket."""
    return model(tokens, position, key_len=key_len_carrier.shape[0], block_regions=True)


def _prefill(model: Transformer, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
    return model(tokens, start_pos)


class Prefill:
    """Logits of the last position of a prompt chunk: eager by default; compiled (dynamic shapes, on CUDA) with
    MISTRAL_CHAT_COMPILE_PREFILL=1.

    Compiling prefill gains little per prompt (Mistral-7B on an H100: 2048 tokens in 51.6 ms compiled, 49.8 eager
    with the fused kernels of fused.py; 512 in 14.7 and 16-36, bound by launching kernels from Python) but costs
    its compile before the first answer of every start: 42 s with a warm compile cache, over a minute the first
    time. A chat starts now and prefills eagerly. `compile=False` (--no-compile) keeps it eager whatever the
    variable says; tensor-parallel compiled prefill is checked on the CPU only (tests/test_parallel_compiled.py)."""

    def __init__(self, model: Transformer, compile: bool = True) -> None:
        self.model = model
        self._run = _prefill
        self.compiled = (compile and model.device.type == "cuda"
                         and os.environ.get("MISTRAL_CHAT_COMPILE_PREFILL") == "1")
        if self.compiled:
            self._run = torch.compile(_prefill, dynamic=True)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self._run(self.model, tokens, start_pos)[:, -1]


class DecodeStep:
    """Logits for one new token per sequence, given its position; compiled on CUDA unless told otherwise."""

    def __init__(self, model: Transformer, compile: bool = True) -> None:
        self.model = model
        self.compiled = compile
        self.cuda_graphs = model.device.type == "cuda"
        self._position = torch.zeros(1, dtype=torch.long, device=model.device)
        self.quick = compile and quick_compile()
        self._carriers: dict[int, torch.Tensor] = {}  # bucket length -> empty [length, 0] tensor (quick mode)
        self._step = model.forward
        if self.compiled:
            import torch._inductor.config as inductor_config

            import torch._dynamo.config as dynamo_config

            # one graph per (cache bucket, batch size), and a new set for each model loaded in this process
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
            if self.cuda_graphs and os.environ.get("MISTRAL_CHAT_TUNE", "1") == "1":
                inductor_config.coordinate_descent_tuning = True
            mode = "reduce-overhead" if self.cuda_graphs else "default"
            if self.quick:
                self._step = torch.compile(_decode_any_length, mode=mode, fullgraph=True, dynamic=None)
            else:
                self._step = torch.compile(_decode, mode=mode, fullgraph=True, dynamic=False)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """tokens: [B, 1] on the model's device; returns float32 logits [B, vocab] (a fresh tensor)."""
        assert self.model.slots is not None
        if not self.compiled:
            return self.model(tokens, position)[:, -1]
        self._position.fill_(position)
        key_len = key_bucket(position, self.model.slots.capacity)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.quick:
            key_len = self._carrier(key_len)
        return self._step(self.model, tokens, self._position, key_len)[:, -1].clone()

    def _carrier(self, key_len: int) -> torch.Tensor:
        carrier = self._carriers.get(key_len)
        if carrier is None:
            carrier = torch.empty(key_len, 0, device=self.model.device)
            torch._dynamo.maybe_mark_dynamic(carrier, 0)  # the whole-cache bucket may specialize
            self._carriers[key_len] = carrier
        return carrier
