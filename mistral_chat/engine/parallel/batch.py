"""Continuous batching on a tensor-parallel run: rank 0's `ParallelBatchGenerator` and the followers' side of it.

`BatchGenerator` (engine/batch.py) makes every model call through three methods: the rows' cache, a row's reset
before its prompt, and `Transformer.forward_rows` (one row's prompt chunk, or one decode step for every row in
flight). Rank 0's generator broadcasts each call on the session's command channel (session.py) before making it;
each follower makes the same call with the same arguments on its shard (`follow_rows`), so the collectives inside
`forward_rows` pair up. Only rank 0 samples: the tokens a step chose reach the followers as the next step's input.

The model holds one cache on every rank. A batch's row cache replaces the batch-1 session's; rank 0's `Session`
takes it back with a fresh one at its next answer (`Session._claim_cache`), and a follower's session does the same
before the next session command it repeats (follower.py), so both sides start that answer on an empty cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mistral_chat.engine.batch import BatchGenerator, run_rows
from mistral_chat.engine.generate import DEFAULT_PREFILL_CHUNK
from mistral_chat.engine.model import Transformer
from mistral_chat.engine.parallel.group import ParallelRunError
from mistral_chat.engine.parallel.session import ROW_CACHE, ROW_RESET, ROW_STEP, ParallelSession

# what a follower's model.cache_owner is while a batch's row cache is on it (its session's own cache is not)
ROWS_OWNER = object()


def pack_rows(tokens: Sequence[Sequence[int]], starts: Sequence[int], rows: slice, key_len: int) -> list[int]:
    """One `forward_rows` call as int64 ids: [first row, end row, key_len, each row's start..., tokens row by
    row...]; the command's position carries the tokens per row."""
    return [rows.start, rows.stop, key_len, *starts, *(token for row in tokens for token in row)]


def unpack_rows(ids: Sequence[int], width: int) -> tuple[torch.Tensor, torch.Tensor, slice, int]:
    """(tokens [N, width], starts [N], rows, key_len) from `pack_rows`' ids."""
    first, end, key_len = ids[:3]
    n = end - first
    if n < 1 or width < 1 or len(ids) != 3 + n + n * width:
        raise ParallelRunError(f"a batch step from rank 0 holds {len(ids)} ids, not the {3 + n + n * width} of "
                               f"{n} rows of {width} tokens: all ranks must run the same mistral-chat")
    starts = torch.tensor(ids[3:3 + n], dtype=torch.long)
    tokens = torch.tensor(ids[3 + n:], dtype=torch.long).view(n, width)
    return tokens, starts, slice(first, end), key_len


class ParallelBatchGenerator(BatchGenerator):
    """A `BatchGenerator` on rank 0 of a tensor-parallel run: each model call is first sent to the followers.

    `session` is the run's `ParallelSession` (its command channel, its watch over the followers: a dead or failed
    follower raises `ParallelRunError`, as a session's answer does)."""

    def __init__(self, session: ParallelSession, batch_size: int, context_length: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.session = session  # before the base class claims the cache (a mirrored call)
        super().__init__(session.loaded, batch_size, context_length=context_length, prefill_chunk=prefill_chunk)

    def _setup_rows(self) -> None:
        with self.session._collective():
            self.session.channel.send(ROW_CACHE, [self.context_length, self.batch_size, self._requested_chunk])
            super()._setup_rows()

    def _reset_row(self, slot: int) -> None:
        with self.session._collective():
            self.session.channel.send(ROW_RESET, position=slot)
            super()._reset_row(slot)

    def _forward_rows(self, tokens: list[list[int]], starts: list[int], rows: slice, key_len: int) -> torch.Tensor:
        with self.session._collective():
            self.session.channel.send(ROW_STEP, pack_rows(tokens, starts, rows, key_len), position=len(tokens[0]))
            return self.session._settle(super()._forward_rows(tokens, starts, rows, key_len))


def follow_rows(model: Transformer, op: int, ids: Sequence[int], position: int) -> None:
    """A follower's side of one of rank 0's batch calls (`op` ROW_CACHE, ROW_RESET or ROW_STEP)."""
    if op == ROW_CACHE:
        context_length, batch_size, prefill_chunk = ids
        model.setup_row_cache(context_length, batch_size, prefill_chunk)
        model.cache_owner = ROWS_OWNER
        return
    if model.row_positions is None or getattr(model, "cache_owner", None) is not ROWS_OWNER:
        raise ParallelRunError("rank 0 ran a batch step but this rank holds no batch cache: the ranks lost step; "
                               "start again")
    if op == ROW_RESET:
        model.row_positions.reset(position)
    elif op == ROW_STEP:
        run_rows(model, *unpack_rows(ids, position))
    else:
        raise ParallelRunError(f"unknown command {op} from rank 0: all ranks must run the same mistral-chat")
