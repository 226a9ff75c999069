"""Prompts prefilled a chunk at a time inside continuous batching's decode steps, while every row decodes.

A batch decode step reads all the weights to make one token for each row: at batch 64 on an H100 its products are
bound by memory, and a hundred-odd more tokens through the same products cost little. So while the batch's rows
are busy, the next request's prompt is prefilled `STAGED_CHUNK` tokens a step into a spare row of the cache (the
staging row, `Transformer.forward_rows`' `chunk`), and once whole it waits in a parking row, its first token's
logits kept, until a decode row frees; then its keys and values are copied into that row and it decodes from the
next step on, with no prefill pause for the others (engine/batch.py). Without parking rows a prefilled prompt
waits in the staging row.

The chunks of a prompt start at 0, C, 2C, ...; the last one ends at the prompt's end (it may run over positions
the one before wrote, which writes the same keys and values again). A prompt shorter than a chunk is padded with
token 0 after its end: those positions' keys are never visible to the prompt's tokens, and decoding overwrites
them before any query reaches them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# prompt tokens a decode step carries: batch 64's step of Mistral-7B on an H100 stays bound by memory up to about
# 200 tokens (64 + 128 rows: ~4.3 ms of bf16 compute against ~5.5 ms of weight reads, both at what the H100 does),
# and 128 a step prefill the next 64 512-token prompts within one wave of 256 steps
STAGED_CHUNK = 128


@dataclass
class Staged:
    """A request whose prompt goes into the cache chunk by chunk; `row`: the cache row holding it."""

    index: int
    request: object  # a batch.BatchRequest
    ids: list[int]
    started: float
    row: int
    next: int = 0  # where the next chunk starts
    logits: torch.Tensor | None = None  # the prompt's last token's logits ([1, vocab]), once prefilled


@dataclass(frozen=True)
class Chunk:
    """The next chunk of the staged prompt: `tokens` ([1, C], on the host) at positions start..., the logits
    wanted of index `last`; `final`: it ends the prompt."""

    tokens: torch.Tensor
    start: int
    last: int
    final: bool


@dataclass
class Stager:
    """The spare rows of a batch cache past its `batch` decode rows: row `batch` takes the staged prompt's chunks,
    the rows after it park prefilled prompts."""

    batch: int
    spare: int  # spare rows: the staging row, then the parking rows
    chunk: int  # tokens a chunk
    staging: Staged | None = None
    parked: deque[Staged] = field(default_factory=deque)
    free_parking: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.staging = None
        self.parked.clear()
        self.free_parking = list(range(self.batch + self.spare - 1, self.batch, -1))  # popped lowest first

    def can_stage(self) -> bool:
        """Whether a new prompt may start: none is being staged and the staging row is not parking one."""
        return self.spare > 0 and self.staging is None and all(p.row != self.batch for p in self.parked)

    def start(self, index: int, request: object, ids: list[int], started: float) -> None:
        self.staging = Staged(index, request, ids, started, self.batch)

    def next_chunk(self) -> Chunk | None:
        """The staged prompt's next chunk, or None (nothing staged). Nothing changes until `consume`."""
        staged = self.staging
        if staged is None:
            return None
        ids, size = staged.ids, self.chunk
        if len(ids) <= size:
            return Chunk(torch.tensor([ids + [0] * (size - len(ids))]), 0, len(ids) - 1, True)
        start = staged.next if staged.next + size < len(ids) else len(ids) - size
        return Chunk(torch.tensor([ids[start:start + size]]), start, size - 1, start + size >= len(ids))

    def consume(self, chunk: Chunk, logits: torch.Tensor, copy_row: Callable[[int, int], None]) -> None:
        """A step ran `chunk` (the one `next_chunk` gave): the prompt moves on, and once whole, with its last
        token's `logits` ([1, vocab]), parks (copied into a parking row where one is free)."""
        staged = self.staging
        assert staged is not None
        staged.next = chunk.start + self.chunk
        if not chunk.final:
            return
        staged.logits = logits.clone()
        if self.free_parking:
            staged.row = self.free_parking.pop()
            copy_row(self.batch, staged.row)
        self.parked.append(staged)
        self.staging = None

    def unpark(self) -> Staged:
        """The prompt parked longest (its row freed once the caller copied it out)."""
        staged = self.parked.popleft()
        if staged.row != self.batch:
            self.free_parking.append(staged.row)
        return staged


def spare_rows(per_row: int, batch: int, free: int, cuda: bool) -> int:
    """Spare cache rows for staged prompts (a staging row and up to `batch` parking rows) in at most half of the
    `free` bytes left once the batch's own rows (`per_row` bytes each) are allocated, as batch_size_for_memory
    keeps a tenth (and on GPUs 1 GB more) for activations; 0 where not even the staging row fits."""
    usable = free * 0.9 - (1 << 30 if cuda else 0) - per_row * batch
    return max(0, min(batch + 1, int(usable * 0.5 // max(1, per_row))))
