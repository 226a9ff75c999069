"""Compile the engine's Triton kernels while a model's weights load, so that its first answer finds them compiled.

With an empty Triton cache a first answer compiled each kernel as it first ran it: the prefill's before the first
byte, the decode step's after it (6.6 s of a Mistral-7B start on one H100, docs/performance-log.md, 2026-12-06).
Here, as soon as the loader knows the config and the plan, it builds a throwaway model of the same config with
one layer (random weights on the GPU in the same dtype, plan and quantization; the embedding one row, seen through
a broadcast), and a thread runs on it the forward passes a session's first answer runs (`first_answer_steps`)
while the weights load. Each kernel is then compiled with the specializations the real calls will have (Triton
keys a compiled kernel on its constexprs, on each integer argument's divisibility by 16 and equality to 1, and on
each pointer's 16-byte alignment: the same code on the same shapes gives the same keys), into Triton's
per-process and disk caches, where the real model's calls find it.

- While the throwaway's steps run on that thread, its kernel launches compile without running (`compile_only`),
  and through Triton's AsyncCompileMode the compiles run on a pool of threads, each kernel once. Triton's passes
  and ptxas release the GIL for most of a compile (two threads compiled twelve GEMV variants 1.4x faster than
  one with Triton 3.6, 1.9x with 3.9, on a 2-core machine), so the compiles overlap each other and the loader.
- An autotuned kernel (the int8, int4 and experts' products, and the GEMV where no measured configuration
  applies) has every configuration compiled there, but is timed only once the weights are in (`finish`, on the
  loading thread): timed while the loader's copies and load-time quantization run, it could pick a worse
  configuration, which Triton then keeps on disk. So the tuning comes before the first answer, not inside it.
- Only on CUDA with one process (under --tp each rank's steps hold collectives with the others), where the plan
  runs Triton kernels and the throwaway fits beside the weights. A failure costs only the time the warm-up would
  have saved: loading goes on, and --debug logs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import torch

from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.decode import MIN_BUCKET, key_bucket, prefill
from mistral_chat.engine.generate import DEFAULT_PREFILL_CHUNK
from mistral_chat.engine.kernels.fused import INTERPRETED
from mistral_chat.engine.loader import load_random, prepare_quantized
from mistral_chat.engine.memory import estimate_memory, free_memory
from mistral_chat.engine.model import Transformer
from mistral_chat.engine.options import SamplingParams
from mistral_chat.engine.plan import KernelPlan
from mistral_chat.engine.speculate import automatic_drafts
from mistral_chat.engine.weights import Convert, plain_convert

try:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
except ImportError:  # CPU-only torch builds may ship without Triton: nothing to compile
    Autotuner = JITFunction = None

log = logging.getLogger(__name__)

# Prompt lengths prefilled: a multiple of 16 and one that is not (rope_and_cache's token count is an integer
# argument, specialized on its divisibility by 16)
PREFILL_LENGTHS = (16, 17)
DECODE_REACH = 4096  # decode steps in each cache bucket of an answer's first positions (one combine kernel a bucket)
MARGIN = 1 << 30  # bytes to leave free beside the weights and the throwaway model, else no warm-up
MAX_WORKERS = 8  # compile threads at most (half the cores; the loader's readers take the rest)


def start_warmup(config: ModelConfig, plan: KernelPlan, device: torch.device, dtype: torch.dtype,
                 quantize: str | None, context: int, world: int, weights_bytes: int) -> KernelWarmup | None:
    """The warm-up for a model about to load (`config` and `plan` as the loader made them, `quantize` as it loads,
    `context` the sessions' context, `weights_bytes` the weights' estimate), started; None where it does not apply
    (module docstring) or would not fit."""
    if not applies(device, plan, world):
        return None
    if device.type == "cuda" and device.index is None:  # the thread's own current device may differ
        device = torch.device("cuda", torch.cuda.current_device())
    need = estimate_memory(one_layer(config), dtype, context, quantize=quantize).total
    spare = free_memory(device) - weights_bytes - need
    if spare < MARGIN:
        log.debug("kernel warm-up left out: %.1f GB would stay free beside the weights and a one-layer model",
                  spare / 1e9)
        return None
    try:  # here, before the weights: what converting its weights takes for a while is free again when they load
        model = throwaway_model(config, plan, device, dtype, quantize, context)
        steps = first_answer_steps(model)
    except Exception:
        log.debug("kernel warm-up: building its model failed (the first answer compiles its kernels)", exc_info=True)
        return None
    return KernelWarmup(model, steps, compile_workers()).start()


def applies(device: torch.device, plan: KernelPlan, world: int) -> bool:
    """Whether a load warms the kernels up: on CUDA, one process, a plan with Triton kernels (compiled, not
    interpreted)."""
    kernels = plan.fused or "triton" in (plan.attention, plan.gemv, plan.int8, plan.int4, plan.moe)
    return device.type == "cuda" and world == 1 and kernels and JITFunction is not None and not INTERPRETED


def compile_workers() -> int:
    """Compile threads: half the cores this process may use, at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(MAX_WORKERS, cores // 2))


def one_layer(config: ModelConfig) -> ModelConfig:
    """`config` with one layer (the first layer's window where layers differ; the cache is sized as before)."""
    return dataclasses.replace(config, n_layers=1, layer_windows=config.layer_windows[:1])


def throwaway_model(config: ModelConfig, plan: KernelPlan, device: torch.device, dtype: torch.dtype,
                    quantize: str | None, context: int) -> Transformer:
    """A model of `config`'s shape with one layer, random weights (loader.load_random, as random_model's) converted as
    the loader converts a checkpoint's, the embedding one row broadcast to the vocabulary, and a session's cache
    for `context` tokens: its kernels' arguments are the real model's, its memory one layer's and the output's."""
    config = one_layer(config)
    with torch.device("meta"):
        model = Transformer(config, plan=plan)
        shapes = {name: t.shape for name, t in model.state_dict().items()}
        convert = _convert(model, config, quantize, device, dtype)
    load_random(model, shapes, convert, device, dtype, embedding_row=True)
    model.setup_cache(context, batch=1, prefill_chunk=DEFAULT_PREFILL_CHUNK)
    return model


def _convert(model: Transformer, config: ModelConfig, quantize: str | None, device: torch.device,
             dtype: torch.dtype) -> Convert:
    """The loader's skeleton changes and load-time conversion for `quantize` (an AWQ checkpoint's layout as
    awq.prepare_awq makes it: int4 projections, the output projection in the model dtype)."""
    from mistral_chat.engine.quant import int4_convert, prepare_int4

    if quantize is None:
        return plain_convert(device, dtype)
    if config.quantization != "awq":
        return prepare_quantized(model, quantize, device, dtype)
    output = model.output
    formats = prepare_int4(model, dtype)
    model.output = output
    formats.pop("output.weight", None)
    return int4_convert(device, dtype, formats)


def first_answer_steps(model: Transformer) -> list[Callable[[], torch.Tensor]]:
    """The forward passes a session's first answer runs, on `model` (its cache set up as a session's), each as
    a call: the prompt's prefill (decode.prefill) at PREFILL_LENGTHS; where the plan decodes in CUDA graphs, one
    decode step in each cache bucket of the first DECODE_REACH positions as decode.GraphedStep captures it (the
    position a tensor, attention reading the bucket), and the verify step of speculation's automatic drafts
    (speculate.VerifyStep: the last token and the drafts, every position's logits)."""
    assert model.slots is not None, "call setup_cache first"
    device, capacity = model.device, model.slots.capacity
    steps: list[Callable[[], torch.Tensor]] = []
    for length in PREFILL_LENGTHS:
        if length <= model.slots.max_chunk:
            steps.append(functools.partial(prefill, model, torch.zeros(1, length, dtype=torch.long, device=device), 0))
    if not model.plan.decode_graphs or model.plan.compile_decode or model.parallel.enabled:
        return steps  # decode compiles (torch.compile) or runs eagerly at every length: not warmed here
    position = torch.zeros(1, dtype=torch.long, device=device)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    buckets = dict.fromkeys(key_bucket(p, capacity) for p in range(0, DECODE_REACH, MIN_BUCKET))
    for bucket in buckets:
        steps.append(functools.partial(_graphed, model, token, position, bucket, False))
    drafts = min(automatic_drafts(model, SamplingParams()), model.slots.max_chunk - 1)
    if drafts > 0:
        verify = torch.zeros(1, drafts + 1, dtype=torch.long, device=device)
        steps.append(functools.partial(_graphed, model, verify, position, key_bucket(drafts, capacity), True))
    return steps


def _graphed(model: Transformer, tokens: torch.Tensor, position: torch.Tensor, key_len: int,
             every: bool) -> torch.Tensor:
    """The call decode.GraphedStep captures: the position a tensor, `key_len` a cache bucket."""
    return model(tokens, position, key_len=key_len, all_logits=every)


class KernelWarmup:
    """A throwaway model's first-answer steps (`first_answer_steps`), compiled on a background thread while the
    weights load (`start`), then run for real and freed once they are in (`finish`); `close` stops it where
    loading failed. Neither raises."""

    def __init__(self, model: Transformer, steps: list[Callable[[], torch.Tensor]], workers: int) -> None:
        self.device = model.device
        self.workers = workers
        self._pool = _CountingPool(workers, thread_name_prefix="kernel-compile")
        self._thread = threading.Thread(target=self._compile, name="kernel-warmup", daemon=True)
        self._stop = threading.Event()
        self._model: Transformer | None = model
        self._steps = steps
        self._started = 0.0
        self._compiled: float | None = None  # seconds from the start to the compiles' end, once they succeeded
        self._where = ""
        self._over = False

    def start(self) -> KernelWarmup:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def _compile(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            with torch.no_grad():
                with compile_only(self._pool) as pooled:
                    for step in self._steps:
                        if self._stop.is_set():
                            return
                        step()
            self._compiled = time.perf_counter() - self._started
            self._where = f"{self._pool.submitted} compiles on {self.workers} threads" if pooled else \
                "compiles on its thread"  # a Triton without AsyncCompileMode
        except Exception:
            log.debug("kernel warm-up: compiling failed (the first answer compiles what is missing)", exc_info=True)

    def finish(self) -> None:
        """Once the weights are in: wait for the compiles, run the steps for real on this thread (the autotuned
        kernels are timed now, on a quiet GPU), free the throwaway model."""
        if self._over:
            return
        self._over = True
        try:
            self._join()
            if self._compiled is None:
                return
            tuning = time.perf_counter()
            with torch.no_grad():
                for step in self._steps:
                    step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            log.info("kernel warm-up: %s done %.2f s after it started, then its %d steps run in %.2f s "
                     "(autotuning)", self._where, self._compiled, len(self._steps), time.perf_counter() - tuning)
        except Exception:
            log.debug("kernel warm-up: running its steps failed", exc_info=True)
        finally:
            self._free()

    def close(self) -> None:
        """Stop where `finish` did not run (loading failed): no further steps, queued compiles dropped, the threads
        joined, the model freed."""
        if self._over:
            return
        self._over = True
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self._join()
        finally:
            self._free()

    def _join(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()
        self._pool.shutdown(wait=True)

    def _free(self) -> None:
        self._model, self._steps = None, []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _CountingPool(ThreadPoolExecutor):
    """A thread pool that counts what was submitted to it (the compiles, for the log)."""

    submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@contextlib.contextmanager
def compile_only(executor: Executor) -> Iterator[bool]:
    """While it lasts, the calling thread's Triton launches compile their kernel without running it (its
    arguments' specializations as the launch has them), and an autotuned kernel's launch compiles each of its
    configurations without timing them; the compiles run on `executor`, each distinct kernel once, where this
    Triton has AsyncCompileMode (it yields whether so; else on the calling thread), and are all done when it
    ends. Other threads' launches are left as they are."""
    mode = _async_compile(executor)
    with _REDIRECT.compiling_only(), mode if mode is not None else contextlib.nullcontext():
        yield mode is not None


def _async_compile(executor: Executor) -> Any:
    """Triton's AsyncCompileMode on `executor` (Triton 3.4 and later, a private module), or None."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None
    return AsyncCompileMode(executor)


class _LaunchRedirect:
    """Wrappers around Triton's JITFunction.run and Autotuner.run, installed while some thread is in
    `compile_only` (one installation for every such thread; the originals back when the last one leaves). A
    launch from a thread in `compile_only` becomes a compile (warmup=True); any other goes through unchanged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._originals: tuple[Any, Any] | None = None
        self._local = threading.local()

    def redirected(self) -> bool:
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def compiling_only(self) -> Iterator[None]:
        self._install()
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = False
            self._uninstall()

    def _install(self) -> None:
        with self._lock:
            if self._users == 0:
                jit_run, tuner_run = JITFunction.run, Autotuner.run
                redirect = self

                def run(kernel: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
                    return jit_run(kernel, *args, grid=grid, warmup=warmup or redirect.redirected(), **kwargs)

                def tuned_run(tuner: Any, *args: Any, **kwargs: Any) -> Any:
                    if not redirect.redirected():
                        return tuner_run(tuner, *args, **kwargs)
                    for config in tuner.configs:  # all compiled, none timed: the tuning waits for `finish`
                        tuner.fn.run(*args, **{**kwargs, **config.all_kwargs(), "warmup": True})
                    return None

                self._originals = (jit_run, tuner_run)
                JITFunction.run, Autotuner.run = run, tuned_run
            self._users += 1

    def _uninstall(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._originals is not None:
                JITFunction.run, Autotuner.run = self._originals
                self._originals = None


_REDIRECT = _LaunchRedirect()  # the one installation of the wrappers (Triton's classes are process-wide)
