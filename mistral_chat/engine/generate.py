"""Streaming generation with a KV cache that lives across the turns of a conversation."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from mistral_chat.engine.decode import DecodeStep, prefill
from mistral_chat.engine.loader import LoadedModel, is_out_of_memory
from mistral_chat.engine.memory import session_context
from mistral_chat.engine.sampling import Penalties, SamplingParams, StopStrings, make_generator, sample
from mistral_chat.engine.speculate import PromptLookup, Speculator, VerifyStep, automatic_drafts, speculation_off
from mistral_chat.engine.stats import GenerationStats
from mistral_chat.errors import ContextLengthError, DeviceError
from mistral_chat.text.tokenizer import StreamDecoder

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 2048


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TokenReader:
    """Copies a sampled token to the host without waiting for the GPU work queued after it (an asynchronous
    copy into pinned memory and an event), where `int(token)` would wait for the whole stream."""

    def __init__(self, device: torch.device, poll: Callable[[], None] | None = None) -> None:
        cuda = device.type == "cuda"
        self.host = torch.empty(1, dtype=torch.long, pin_memory=cuda)
        self.ready = torch.cuda.Event() if cuda else None
        self.poll = poll  # called while waiting (it may raise), instead of blocking in CUDA
        self.waited = 0.0  # seconds spent in `value` waiting for the device

    def start(self, token: torch.Tensor) -> None:
        self.host.copy_(token.reshape(-1)[:1], non_blocking=True)
        if self.ready is not None:
            self.ready.record()

    def value(self) -> int:
        if self.ready is not None:
            started = time.perf_counter()
            if self.poll is not None:
                while not self.ready.query():
                    self.poll()
            self.ready.synchronize()
            self.waited += time.perf_counter() - started
        return int(self.host[0])


class Session:
    """One conversation's view of a model: its KV cache and the token ids the cache holds.

    `generate(ids)` reuses the cache for the longest prefix `ids` shares with what was fed before, so a follow-up
    turn prefills only its new tokens. Not thread-safe: one thread (the engine's worker) drives a session.

    With `run_ahead` (on GPUs), each decode step is queued before the host reads the token it consumes, so the
    GPU does not wait while the host turns tokens into text; a step queued for a token that ends the answer is
    wasted, and its cache entry is overwritten by the next turn (positions past `tokens` are never attended).
    """

    def __init__(self, loaded: LoadedModel, context_length: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, compile: bool | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.context_length = session_context(loaded.config, context_length)
        self._requested_chunk = prefill_chunk
        self.tokens: list[int] = []
        self._claim_cache()
        assert self.model.slots is not None
        self.prefill_chunk = min(prefill_chunk, self.model.slots.max_chunk)
        if compile is None:
            compile = loaded.compile
        self.decode = DecodeStep(self.model, compile=compile)
        self.prefill = functools.partial(prefill, self.model)  # (tokens, start) -> last logits
        self.stats = GenerationStats()
        self.generated_ids: list[int] = []  # the last answer's token ids (EOS excluded)
        self.run_ahead = loaded.device.type == "cuda"
        self._verify: VerifyStep | None = None  # speculative decoding's verify step, made at first use
        self._told: set[str] = set()  # why speculation was off, logged once a session

    def _claim_cache(self) -> None:
        """Give the model a KV cache for this session. The model holds one cache: when another session on the
        same model took it since, this session starts over on a fresh one instead of reading the other's."""
        if getattr(self.model, "cache_owner", None) is self:
            return
        try:
            self.model.setup_cache(self.context_length, batch=1, prefill_chunk=self._requested_chunk)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise DeviceError(f"out of memory on {self.loaded.device} allocating the cache for a "
                              f"{self.context_length}-token context: lower --context") from exc
        self.model.cache_owner = self
        self.tokens = []

    def reset(self) -> None:
        """Forget the cache (the next call prefills everything)."""
        self.tokens = []
        assert self.model.slots is not None
        self.model.slots.reset()

    def _reuse(self, prompt: Sequence[int]) -> int:
        """Keep the cached prefix shared with `prompt` where the cache still allows; return its length."""
        assert self.model.slots is not None
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1)  # at least one token must run
        if keep < len(self.tokens):
            if not self.model.slots.can_rewind(keep):
                keep = 0
            self.keep_prefix(keep)
        return keep

    def keep_prefix(self, keep: int) -> None:
        """Keep the first `keep` cached tokens (0: start over); `_reuse` decides how many (on a tensor-parallel
        follower, rank 0's `_reuse`)."""
        assert self.model.slots is not None
        if keep == 0:
            self.model.slots.reset()
        else:
            self.model.slots.rewind(keep)
        self.tokens = self.tokens[:keep]

    def _token_reader(self) -> TokenReader:
        return TokenReader(self.loaded.device)

    @torch.no_grad()
    def _feed(self, ids: Sequence[int]) -> torch.Tensor:
        """Run `ids` after the cached tokens, in chunks; return the last position's logits ([1, vocab])."""
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = list(ids[start:start + self.prefill_chunk])
            tokens = torch.tensor([chunk], dtype=torch.long, device=self.loaded.device)
            logits = self.prefill(tokens, len(self.tokens))
            self.tokens.extend(chunk)
        assert logits is not None
        return logits

    def check_fits(self, prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {len(prompt_ids)} tokens but the context holds {self.context_length}: "
                "shorten the prompt, or raise --context if the model allows")

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                 cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the answer's text as it is produced; `self.stats` describes it once the iterator ends."""
        params = params or SamplingParams()
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty: give some text to answer")
        self.check_fits(prompt_ids)
        self._claim_cache()
        tokenizer = self.loaded.tokenizer
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.stats = stats
        self.generated_ids = []
        started = time.perf_counter()
        first_at = 0.0
        try:
            keep = self._reuse(prompt_ids)
            stats.prefilled_tokens = len(prompt_ids) - keep
            logits = self._feed(prompt_ids[keep:])
            generator = make_generator(params, self.loaded.device)
            decoder = StreamDecoder(tokenizer)
            stops = StopStrings(params.stop)
            penalties = (Penalties(params, prompt_ids, logits.shape[-1], logits.device)
                         if params.penalised else None)
            reader = self._token_reader()
            stats.finish_reason = "length"
            drafts = automatic_drafts(self.model, params) if params.speculate is None else params.speculate
            speculator = self._speculator(params, drafts, prompt_ids, generator, reader, stats) if drafts else None
            if speculator is not None:
                yield from self._answer_speculatively(speculator, params, decoder, stops, reader, stats, cancel,
                                                      started, logits)
                return
            for i in range(params.max_tokens):
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                if penalties is not None:
                    logits = penalties.apply(logits)
                next_token = sample(logits, params, generator)
                if penalties is not None:
                    penalties.observe(next_token)
                reader.start(next_token)
                last = i + 1 == params.max_tokens or len(self.tokens) + 1 >= self.context_length
                ahead = None
                # not for the first token, whose time is measured alone (and a first decode compiles for long)
                if self.run_ahead and not last and i > 0:
                    ahead = self.decode(next_token.view(1, 1), len(self.tokens))
                token = reader.value()
                if i == 0:
                    first_at = time.perf_counter()
                    stats.time_to_first_token = first_at - started
                    reader.waited = 0.0
                delta = self._take(token, decoder, stops, stats, reader, first_at)
                if delta is None:
                    break
                if delta:
                    yield delta
                if stops.stopped:
                    break
                if last:
                    break
                logits = ahead if ahead is not None else self.decode(next_token.view(1, 1), len(self.tokens))
                self.tokens.append(token)
            tail = _tail(decoder, stops)
            if tail:
                yield tail
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            self.reset()
            raise DeviceError(f"out of memory on {self.loaded.device} while generating: shorten the conversation, "
                              "lower --context, or try --quantize int8") from exc
        finally:
            if stats.generated_tokens:
                first_at = first_at or (started + stats.time_to_first_token if stats.time_to_first_token else 0.0)
                stats.decode_seconds = time.perf_counter() - first_at if first_at else 0.0

    def _take(self, token: int, decoder: StreamDecoder, stops: StopStrings, stats: GenerationStats,
              reader: TokenReader, first_at: float) -> str | None:
        """One generated token through the end-of-answer rules: None at EOS (the answer ends before it), else the
        text it adds (`stops.stopped` then says whether a stop string ended the answer)."""
        if token == self.loaded.tokenizer.eos_id:
            stats.finish_reason = "stop"
            return None
        stats.generated_tokens += 1
        self.generated_ids.append(token)
        stats.decode_seconds = time.perf_counter() - first_at
        stats.host_wait_seconds = reader.waited
        delta = stops.push(decoder.push(token))
        if stops.stopped:
            stats.finish_reason = "stop"
        return delta

    def _speculator(self, params: SamplingParams, drafts: int, prompt_ids: Sequence[int],
                    generator: torch.Generator | None,
                    reader: TokenReader, stats: GenerationStats) -> Speculator | None:
        """The token source of a speculative answer, or None where this model or these settings cannot speculate
        (said once a session in the log)."""
        off = speculation_off(self.model, params)
        if off is not None:
            if off not in self._told:
                self._told.add(off)
                log.info("speculative decoding is off: %s", off)
            return None
        assert self.model.slots is not None
        if self._verify is None or self._verify.slots is not self.model.slots:
            self._verify = VerifyStep(self.model)
        n = min(drafts, self.model.slots.max_chunk - 1)
        return Speculator(self.model, self.decode, self._verify, self.tokens, params, generator, n,
                          PromptLookup(prompt_ids), self.context_length, reader, self.run_ahead, stats)

    def _answer_speculatively(self, speculator: Speculator, params: SamplingParams, decoder: StreamDecoder,
                              stops: StopStrings, reader: TokenReader, stats: GenerationStats,
                              cancel: threading.Event | None, started: float, logits: torch.Tensor) -> Iterator[str]:
        """`generate`'s loop with tokens from `speculator`: each token goes through the same end-of-answer rules
        (EOS, stop strings, max tokens, the context) one by one, whether it came from a draft or not."""
        first_at = 0.0
        token = speculator.first(logits)
        for i in range(params.max_tokens):
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                break
            if i == 0:
                first_at = time.perf_counter()
                stats.time_to_first_token = first_at - started
                reader.waited = 0.0
            delta = self._take(token, decoder, stops, stats, reader, first_at)
            if delta is None:
                break
            if delta:
                yield delta
            if stops.stopped:
                break
            if i + 1 == params.max_tokens or len(self.tokens) + 1 >= self.context_length:
                break
            token = speculator.advance(token, params.max_tokens - i - 1)
        tail = _tail(decoder, stops)
        if tail:
            yield tail


def _tail(decoder: StreamDecoder, stops: StopStrings) -> str:
    """What the decoder and the stop strings still hold once the answer ends (nothing after a stop string)."""
    return "" if stops.stopped else stops.push(decoder.flush()) + stops.flush()
