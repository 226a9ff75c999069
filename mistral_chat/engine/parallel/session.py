"""Rank 0's session of a tensor-parallel run, and the commands that make the followers repeat its cache steps.

Rank 0 drives an ordinary `Session` whose cache operations (`reset`, prefix reuse, `feed`) are first broadcast
to the followers, which repeat them on their own shard (follower.py): every model forward runs on all ranks with
the same tokens. Only rank 0 samples; the token it picked reaches the followers as the next decode step's input,
so the ranks never depend on identical random streams, and a cancelled answer simply sends nothing more.
Continuous batching sends its model calls on the same channel, each step's tokens with it (parallel/batch.py).

Commands travel on a gloo group of their own with a long timeout (a follower may wait hours for the next
message); the model's collectives use the default group (NCCL on GPUs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mistral_chat.engine.generate import DEFAULT_PREFILL_CHUNK, Session, TokenReader
from mistral_chat.engine.loader import LoadedModel
from mistral_chat.engine.parallel.group import ParallelRunError, abort_nccl, leave_process_group

if TYPE_CHECKING:
    from mistral_chat.engine.parallel.launcher import FollowerProcesses

log = logging.getLogger(__name__)

# command opcodes, sent as the first element of an int64 header [op, n ids, first id, position]
FEED, DECODE, REUSE, RESET, SHUTDOWN = 1, 2, 3, 4, 5
ROW_CACHE, ROW_RESET, ROW_STEP = 6, 7, 8  # continuous batching's model calls (parallel/batch.py)


class CommandChannel:
    """Rank 0 broadcasts (op, token ids); followers receive them in the same order."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def send(self, op: int, ids: Sequence[int] = (), position: int = 0) -> None:
        """One broadcast for a command of at most one token (every decode step), two for longer ones."""
        header = torch.tensor([op, len(ids), ids[0] if len(ids) else 0, position], dtype=torch.long)
        dist.broadcast(header, src=0, group=self.group)
        if len(ids) > 1:
            dist.broadcast(torch.tensor(list(ids), dtype=torch.long), src=0, group=self.group)

    def receive(self) -> tuple[int, list[int], int]:
        """(op, ids, position) as rank 0 sent them."""
        header = torch.empty(4, dtype=torch.long)
        dist.broadcast(header, src=0, group=self.group)
        op, n, first, position = header.tolist()
        if n <= 1:
            return op, [first][:n], position
        ids = torch.empty(n, dtype=torch.long)
        dist.broadcast(ids, src=0, group=self.group)
        return op, ids.tolist(), position

    def share(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank (a pickled object: setup only, not per token)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather_errors(self, error: str | None) -> list[str | None]:
        """Every rank's setup error (None where it went well), on every rank."""
        errors: list[str | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(errors, error, group=self.group)
        return errors


def share_token(token: torch.Tensor, process_group: Any) -> None:
    """Rank 0's token ([1, 1] ids on the model's device) into `token` on every rank: a broadcast in the device's
    queue, so neither rank 0 nor a follower waits for the GPU to know it."""
    dist.broadcast(token, src=0, group=process_group)


class ParallelSession(Session):
    """A `Session` on rank 0 of a tensor-parallel group: same interface, every cache step mirrored on all ranks.

    `followers` are the processes rank 0 spawned (None under torchrun). `close()` (or leaving a `with` block)
    shuts the followers down; a dead rank raises `ParallelRunError`.
    """

    def __init__(self, loaded: LoadedModel, channel: CommandChannel, followers: FollowerProcesses | None,
                 context_length: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.channel = channel
        self.followers = followers
        self.closed = False
        self.world = loaded.model.parallel.world
        self.restore_threads: int | None = None  # rank 0's torch threads before a CPU run lowered them
        self._next_check = 0.0
        super().__init__(loaded, context_length=context_length, prefill_chunk=prefill_chunk)
        self.decode = _MirroredDecode(self.decode, self)

    @property
    def failure(self) -> str | None:
        """Why the run stopped (a rank died), or None while all ranks are alive."""
        return self.followers.failure if self.followers is not None else None

    @contextmanager
    def _collective(self) -> Iterator[None]:
        if self.closed:
            raise ParallelRunError("the tensor-parallel run was closed: load the model again")
        if self.failure is not None:
            raise ParallelRunError(self.failure)
        if self.followers is not None:
            self.followers.busy = True
        try:
            yield
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # DistBackendError and friends: a peer went away
            failure = self.followers.wait_for_failure(2.0) if self.followers is not None else None
            if failure is not None:
                raise ParallelRunError(failure) from exc
            if isinstance(exc, dist.DistError):
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ParallelRunError(f"tensor-parallel communication failed ({first}): a rank died or the "
                                       "network dropped; see the other ranks' output, then start again") from exc
            raise
        finally:
            if self.followers is not None:
                self.followers.busy = False

    def reset(self) -> None:
        with self._collective():
            self.channel.send(RESET)
        super().reset()

    def _reuse(self, prompt: Sequence[int]) -> int:
        keep = super()._reuse(prompt)
        with self._collective():
            self.channel.send(REUSE, position=keep)
        return keep

    def _feed(self, ids: Sequence[int]) -> torch.Tensor:
        with self._collective():
            self.channel.send(FEED, ids, len(self.tokens))
            return self._settle(super()._feed(ids))

    def _settle(self, out: torch.Tensor) -> torch.Tensor:
        """On GPUs, wait for the step's kernels while watching the followers.

        A later `.item()` would block holding the GIL inside an NCCL collective that a dead rank never joins,
        so no thread could notice; this loop checks the processes between polls of a CUDA event instead.
        """
        if self.followers is None or out.device.type != "cuda":
            return out
        done = torch.cuda.Event()
        done.record()
        while not done.query():
            self._check_followers()
        return out

    def _check_followers(self) -> None:
        """ParallelRunError if a follower died (looking at the processes at most every 2 ms)."""
        now = time.monotonic()
        if self.followers is None or now < self._next_check:
            return
        self._next_check = now + 0.002
        failure = self.followers.check()
        if failure is not None:
            raise ParallelRunError(failure)

    def _token_reader(self) -> TokenReader:
        # decode runs ahead: the host waits for a token while the next step's collectives run, so watch the
        # followers meanwhile as `_settle` does
        return TokenReader(self.loaded.device, poll=self._check_followers if self.followers is not None else None)

    def close(self) -> None:
        """Tell the followers to exit, wait for them, and leave the process group. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self.followers is not None:
            self.followers.stopping()
        if self.failure is None:
            try:
                self.channel.send(SHUTDOWN)
            except RuntimeError:
                log.debug("shutdown broadcast failed", exc_info=True)
        if self.failure is not None and self.loaded.device.type == "cuda":
            abort_nccl()  # a collective with the dead rank may still be pending on the GPU
        else:
            leave_process_group()  # while the followers leave too: NCCL's teardown can wait for every rank
        if self.followers is not None:
            self.followers.close()
        if self.restore_threads is not None:
            torch.set_num_threads(self.restore_threads)

    def __enter__(self) -> "ParallelSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MirroredDecode:
    """Wraps a session's one-token decode step: the followers run the same step with the same token.

    The command carries only the position; the token goes from rank 0's GPU to the others' (`share_token`),
    so rank 0 can queue the step before it reads the token, as a one-GPU session does (`Session.run_ahead`).
    """

    def __init__(self, step: Callable[[torch.Tensor, int], torch.Tensor], session: ParallelSession) -> None:
        self.step = step
        self.session = session

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        with self.session._collective():
            self.session.channel.send(DECODE, position=position)
            tokens = tokens.reshape(1, 1).contiguous()
            share_token(tokens, self.session.model.parallel.group)
            out = self.step(tokens, position)
            return out if self.session.run_ahead else self.session._settle(out)

    def __getattr__(self, name: str) -> Any:  # compiled, cuda_graphs, ... of the wrapped step
        return getattr(self.step, name)
