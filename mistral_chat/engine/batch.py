"""Continuous batching: many answers generated together, each request taking a free row of the cache.

`BatchGenerator.generate(requests)` keeps up to `batch_size` sequences in flight. Requests are admitted into free
rows by prefilling their prompts, chunk by chunk; then every step decodes one token for all rows in
flight at once, each row at its own position (`Transformer.forward_rows`: per-row positions and masks), so prompts
of different lengths share a step. A sequence that ends (EOS, a stop string, max tokens, the context) frees its row
at once and the next request takes it. Each row samples with its own `SamplingParams` (greedy, temperature,
top-k/p, min-p, penalties, seed) and streams its own text (UTF-8-safe, stop strings held back).

Greedy answers equal those of `Session.generate` for the same prompts (float32; tests/test_batch.py). Prompts
are prefilled eagerly, as many rows together as are admitted at once (consecutive free rows, chunks of one length,
at most `prefill_chunk` tokens a call); decode steps run eagerly too, or, where the plan's batch_graphs says so (one
GPU), over every row captured in CUDA graphs (`decode.GraphedRows`), each step launched as soon as the tokens it
takes are chosen, so that it runs while the host accepts them. Attention is the plan's: the decode kernel with a
mask per row, or plain PyTorch.

Every model call goes through three methods (`_setup_rows`, `_reset_row`, `_forward_rows`); under tensor
parallelism `parallel/batch.py`'s `ParallelBatchGenerator` broadcasts each to the followers before making it, so
every rank runs the same calls on its shard while only rank 0 samples.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mistral_chat.engine.decode import GraphedRows, key_bucket
from mistral_chat.engine.generate import DEFAULT_PREFILL_CHUNK
from mistral_chat.engine.loader import LoadedModel, is_out_of_memory
from mistral_chat.engine.memory import estimate_memory, free_memory, session_context
from mistral_chat.engine.model import Transformer
from mistral_chat.engine.moe import EVERY_EXPERT_MAX_TOKENS
from mistral_chat.engine.options import SamplingParams
from mistral_chat.engine.sampling import Penalties, StopStrings, make_generator, sample
from mistral_chat.engine.stats import GenerationStats
from mistral_chat.errors import DeviceError
from mistral_chat.text.tokenizer import StreamDecoder

DEFAULT_MAX_BATCH = 64  # the most rows a batch gets by default, memory permitting


@dataclass(frozen=True)
class BatchRequest:
    """One answer to generate: the prompt's token ids and how to sample. `cancel` ends it early ("cancelled")."""

    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    cancel: threading.Event | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BatchEvent:
    """What happened to the request at `index` (its place in the requests given): new text, or its end.

    With `done`: `answer` is its whole text, `generated_ids` its ids (EOS excluded), `stats` what it cost; or
    `error` says why it got no answer (an empty or too long prompt)."""

    index: int
    text: str = ""
    done: bool = False
    answer: str = ""
    generated_ids: tuple[int, ...] = ()
    stats: GenerationStats | None = None
    error: str = ""


@dataclass
class _Row:
    """A sequence in flight in one row of the cache."""

    index: int
    request: BatchRequest
    position: int  # tokens in the row's cache
    generator: torch.Generator | None
    decoder: StreamDecoder
    stops: StopStrings
    penalties: Penalties | None
    stats: GenerationStats
    started: float
    first_at: float = 0.0
    pending: int = 0  # the last token chosen, fed at `position` by the next step
    ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)


def batch_size_for_memory(loaded: LoadedModel, context_length: int, most: int = DEFAULT_MAX_BATCH,
                          prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> int:
    """How many rows of `context_length` tokens fit the device's free memory (weights already loaded), keeping a
    tenth (and on GPUs 1 GB more) for activations; at least 1, at most `most`. Under tensor parallelism, this
    rank's share of each row (its KV heads)."""
    per_row = estimate_memory(loaded.config, loaded.dtype, context_length, prefill_chunk=prefill_chunk,
                              world=loaded.model.parallel.world).kv_cache
    free = free_memory(loaded.device)
    usable = free * 0.9 - (1 << 30 if loaded.device.type == "cuda" else 0)
    return max(1, min(most, int(usable // max(1, per_row))))


def run_rows(model: Transformer, tokens: torch.Tensor, starts: torch.Tensor, rows: slice,
             key_len: int) -> torch.Tensor:
    """`model.forward_rows` of tokens ([N, T] int64) at starts ([N] int64), both moved to the model's device: the
    one call that makes a batch step, on rank 0 and (with the same arguments) on each tensor-parallel follower."""
    device = model.device
    return model.forward_rows(tokens.to(device), starts.to(device), rows, key_len)


def rows_in_graphs(model: Transformer, batch_size: int) -> bool:
    """Whether decode steps run captured in CUDA graphs (decode.GraphedRows): the plan's batch_graphs on one GPU,
    and for Mixtral at most EVERY_EXPERT_MAX_TOKENS rows (more take the experts' data-dependent path)."""
    return (model.plan.batch_graphs and model.device.type == "cuda" and not model.parallel.enabled
            and (not model.config.num_experts or batch_size <= EVERY_EXPERT_MAX_TOKENS))


class BatchGenerator:
    """Up to `batch_size` sequences of at most `context_length` tokens in flight on one model (one process; under
    tensor parallelism, rank 0's `ParallelBatchGenerator`)."""

    def __init__(self, loaded: LoadedModel, batch_size: int, context_length: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.loaded = loaded
        self.model = loaded.model
        self.batch_size = batch_size
        self.context_length = session_context(loaded.config, context_length)
        self._requested_chunk = prefill_chunk
        self._claim_cache()
        assert self.model.row_positions is not None
        self.prefill_chunk = min(prefill_chunk, self.model.row_positions.max_chunk)
        self._rows: list[_Row | None] = [None] * batch_size
        self._graphed = GraphedRows(self.model, batch_size) if rows_in_graphs(self.model, batch_size) else None
        # in graphs: the next step's logits, launched before this step's tokens were accepted (`_step`), and the
        # rows it ran for
        self._ahead: tuple[torch.Tensor, list[_Row | None]] | None = None

    def _claim_cache(self) -> None:
        """Give the model a cache of `batch_size` rows (again, where a Session took the model's cache since)."""
        if getattr(self.model, "cache_owner", None) is self and self.model.row_positions is not None:
            return
        self._ahead = None
        try:
            self._setup_rows()
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise DeviceError(f"out of memory on {self.loaded.device} allocating the cache for {self.batch_size} "
                              f"sequences of {self.context_length} tokens: lower --batch-size or --context") from exc
        self.model.cache_owner = self

    def generate(self, requests: Iterable[BatchRequest]) -> Iterator[BatchEvent]:
        """Answer `requests` (read lazily, as rows free up): events as they happen, each answer ending with a
        `done` event. Answers finish in any order; `BatchEvent.index` says whose they are."""
        self._claim_cache()
        pending = enumerate(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and None in self._rows:  # admissions may end at once and free their rows
                    free = self._free_slots()
                    items = list(itertools.islice(pending, len(free)))
                    exhausted = len(items) < len(free)
                    yield from self._admit(list(zip(free, items)))
                if not any(self._rows):
                    if exhausted:
                        return
                    continue
                yield from self._step()
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise DeviceError(f"out of memory on {self.loaded.device} while generating a batch: lower --batch-size "
                              "or --context") from exc
        finally:
            self._rows = [None] * self.batch_size
            self._ahead = None

    # ---- for a caller whose requests arrive while others are in flight (the server) ---------------------------

    def claim_cache(self) -> None:
        """Take the model's cache back (a Session may have taken it since): before `admit` and `step`."""
        self._claim_cache()

    @property
    def active(self) -> int:
        """Rows holding a sequence."""
        return sum(row is not None for row in self._rows)

    @property
    def free_rows(self) -> int:
        return self._rows.count(None)

    def _free_slots(self) -> list[int]:
        return [slot for slot, row in enumerate(self._rows) if row is None]

    def admit(self, items: Sequence[tuple[int, BatchRequest]]) -> Iterator[BatchEvent]:
        """Prefill requests (at most `free_rows` of them) into free rows, together; each (index, request)'s events
        carry its index."""
        free = self._free_slots()
        if len(items) > len(free):
            raise ValueError(f"{len(items)} requests to admit but {len(free)} free rows")
        return self._admit(list(zip(free, items)))

    def step(self) -> Iterator[BatchEvent]:
        """One decode step for every row in use."""
        return self._step()

    def clear(self) -> None:
        """Forget every sequence in flight (after a failed step)."""
        self._rows = [None] * self.batch_size
        self._ahead = None

    # ---- the model calls (each one mirrored on the other ranks by a ParallelBatchGenerator) -----------------------

    def _setup_rows(self) -> None:
        """A cache of `batch_size` rows on the model."""
        self.model.setup_row_cache(self.context_length, self.batch_size, self._requested_chunk)

    def _reset_row(self, slot: int) -> None:
        """Forget the positions row `slot` held (before a new sequence's prefill)."""
        assert self.model.row_positions is not None
        self.model.row_positions.reset(slot)

    def _forward_rows(self, tokens: list[list[int]], starts: list[int], rows: slice, key_len: int) -> torch.Tensor:
        """`Transformer.forward_rows` of `tokens` (one list a row of `rows`, all of one length) at `starts`."""
        return run_rows(self.model, torch.tensor(tokens, dtype=torch.long), torch.tensor(starts, dtype=torch.long),
                        rows, key_len)

    # ---- admission: prompts prefilled into their rows -----------------------------------------------------------

    def _admit(self, entries: list[tuple[int, tuple[int, BatchRequest]]]) -> Iterator[BatchEvent]:
        """Prefill each (slot, (index, request)) into its free row, rows together where they can be (`_prefill`),
        then choose each one's first token."""
        started = time.perf_counter()
        device = self.loaded.device
        ready: list[tuple[int, int, BatchRequest, list[int]]] = []
        for slot, (index, request) in entries:
            ids = list(request.prompt_ids)
            if not ids:
                error = "the prompt is empty: give some text to answer"
            elif len(ids) >= self.context_length:
                error = (f"the prompt is {len(ids)} tokens but the context holds {self.context_length}: "
                         "shorten the prompt, or raise --context if the model allows")
            else:
                self._reset_row(slot)
                ready.append((slot, index, request, ids))
                continue
            yield BatchEvent(index, done=True, error=error, stats=GenerationStats(finish_reason="error"))
        if not ready:
            return
        last = self._prefill([(slot, ids) for slot, _, _, ids in ready])
        rows: list[tuple[int, _Row]] = []
        for slot, index, request, ids in ready:
            params = request.params
            vocab = last[slot].shape[-1]
            row = _Row(index=index, request=request, position=len(ids), generator=make_generator(params, device),
                       decoder=StreamDecoder(self.loaded.tokenizer), stops=StopStrings(params.stop),
                       penalties=Penalties(params, ids, vocab, device) if params.penalised else None,
                       stats=GenerationStats(prompt_tokens=len(ids), prefilled_tokens=len(ids),
                                             finish_reason="length"),
                       started=started)
            self._rows[slot] = row
            rows.append((slot, row))
        chosen = self._choose([row for _, row in rows], torch.cat([last[slot] for slot, _ in rows]))
        for (slot, row), token in zip(rows, chosen):
            yield from self._accept(slot, row, token)

    def _prefill(self, prompts: list[tuple[int, list[int]]]) -> dict[int, torch.Tensor]:
        """Each (slot, ids)'s prompt into its row, chunk by chunk; the logits ([1, vocab]) of each one's last token
        by slot. A row takes at most `prefill_chunk` tokens a call (what its cache may take at once); the same
        chunk of rows in consecutive slots with chunks of one length goes in one call, of at most the requested
        prefill chunk's tokens in all (the activations the memory estimate allows for): a wave of 512-token prompts
        takes a call per four rows instead of one a row, even where the cache holds fewer than 2048 positions."""
        assert self.model.row_positions is not None
        capacity = self.model.row_positions.capacity
        chunk = self.prefill_chunk
        call_tokens = max(chunk, self._requested_chunk)
        last: dict[int, torch.Tensor] = {}
        group: list[tuple[int, list[int], bool]] = []  # (slot, chunk, whether it ends the prompt)

        def run(start: int) -> None:
            logits = self._forward_rows([piece for _, piece, _ in group], [start] * len(group),
                                        slice(group[0][0], group[-1][0] + 1), min(capacity, start + len(group[0][1])))
            for i, (slot, _, final) in enumerate(group):
                if final:
                    last[slot] = logits[i:i + 1]
            group.clear()

        for start in range(0, max(len(ids) for _, ids in prompts), chunk):
            for slot, ids in sorted(prompts):
                piece = ids[start:start + chunk]
                if not piece:
                    continue
                if group and (slot != group[-1][0] + 1 or len(piece) != len(group[-1][1])
                              or (len(group) + 1) * len(piece) > call_tokens):
                    run(start)
                group.append((slot, piece, start + chunk >= len(ids)))
            if group:
                run(start)
        return last

    # ---- one decode step for every row in flight ------------------------------------------------------------------

    def _step(self) -> Iterator[BatchEvent]:
        active = [(slot, row) for slot, row in enumerate(self._rows) if row is not None]
        logits = self._take_ahead()
        if logits is None:
            logits = self._run_step(active)
        for _, row in active:
            row.position += 1
        chosen = self._choose([row for _, row in active], logits[[slot for slot, _ in active]])
        if self._graphed is not None and not any(self._ends_now(row) for _, row in active):
            # the next step goes to the GPU now, on these tokens, and runs while they are accepted here (text,
            # stop strings, events): the host's work per row no longer leaves the GPU idle. A row that ends on
            # one of them (EOS, a stop string) just has a step's result dropped
            for (_, row), token in zip(active, chosen):
                row.pending = token
            self._ahead = (self._run_step(active), list(self._rows))
        for (slot, row), token in zip(active, chosen):
            yield from self._accept(slot, row, token)

    def _run_step(self, active: list[tuple[int, _Row]]) -> torch.Tensor:
        """Logits ([rows run, vocab]) of one decode step of the `active` rows' pending tokens at their positions.
        In CUDA graphs every row runs (the graph's shape); eagerly, the rows up to the last one in use. Rows
        without a sequence run token 0 at position 0: finite, and reset on admission."""
        used = self.batch_size if self._graphed else active[-1][0] + 1
        tokens, starts = [0] * used, [0] * used
        for slot, row in active:
            tokens[slot], starts[slot] = row.pending, row.position
        assert self.model.row_positions is not None
        capacity = self.model.row_positions.capacity
        if self._graphed is not None:
            return self._graphed(torch.tensor(tokens, dtype=torch.long)[:, None],
                                 torch.tensor(starts, dtype=torch.long), key_bucket(max(starts), capacity))
        return self._forward_rows([[token] for token in tokens], starts, slice(0, used),
                                  min(capacity, max(starts) + 1))

    def _take_ahead(self) -> torch.Tensor | None:
        """The step launched ahead, if every row now in flight was in it (rows that ended since change nothing;
        a row admitted since was not in it, and the step is run again: the rows it ran for write the same keys
        and values at the same positions again)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        logits, rows = ahead
        return logits if all(row is None or row is rows[slot] for slot, row in enumerate(self._rows)) else None

    def _ends_now(self, row: _Row) -> bool:
        """Whether the row's next token certainly ends it (max tokens, the context): `_accept` ends it there, and
        `_step` sends no step ahead (the row is about to be freed for the next request, whose admission would
        leave that step unused)."""
        return len(row.ids) + 1 >= row.request.params.max_tokens or row.position + 1 >= self.context_length

    def _choose(self, rows: Sequence[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits ([len(rows), vocab]): one argmax for the greedy rows, the others
        sampled one by one with their own parameters and generators; one copy to the host."""
        chosen = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            params = row.request.params
            if params.temperature == 0 and row.penalties is None:
                continue
            row_logits = logits[i:i + 1]
            if row.penalties is not None:
                row_logits = row.penalties.apply(row_logits)
            token = sample(row_logits, params, row.generator)
            if row.penalties is not None:
                row.penalties.observe(token)
            chosen[i] = token[0]
        return chosen.tolist()

    def _accept(self, slot: int, row: _Row, token: int) -> Iterator[BatchEvent]:
        """Take the row's next token: its text, or the end of its answer (as `Session.generate` decides)."""
        stats = row.stats
        now = time.perf_counter()
        if not row.first_at:
            row.first_at = now
            stats.time_to_first_token = now - row.started
        cancel = row.request.cancel
        if cancel is not None and cancel.is_set():
            yield from self._finish(slot, row, "cancelled")
            return
        if token == self.loaded.tokenizer.eos_id:
            yield from self._finish(slot, row, "stop")
            return
        stats.generated_tokens += 1
        length_reached = self._ends_now(row)  # with this token
        row.ids.append(token)
        stats.decode_seconds = now - row.first_at
        delta = row.stops.push(row.decoder.push(token))
        if delta:
            row.pieces.append(delta)
            yield BatchEvent(row.index, delta)
        if row.stops.stopped:
            yield from self._finish(slot, row, "stop")
        elif length_reached:
            yield from self._finish(slot, row, "length")
        else:
            row.pending = token

    def _finish(self, slot: int, row: _Row, reason: str) -> Iterator[BatchEvent]:
        self._rows[slot] = None
        row.stats.finish_reason = reason
        tail = "" if row.stops.stopped or reason == "cancelled" else \
            row.stops.push(row.decoder.flush()) + row.stops.flush()
        if tail:
            row.pieces.append(tail)
        yield BatchEvent(row.index, tail, done=True, answer="".join(row.pieces), generated_ids=tuple(row.ids),
                         stats=row.stats)
