"""A tensor-parallel follower: a rank other than 0, which loads its shard and repeats rank 0's cache steps.

Rank 0 spawns its followers as `python -m mistral_chat.engine.parallel.follower --follower` (launcher.py); under
torchrun the ranks other than 0 call `run_follower` themselves. A follower exits on rank 0's `shutdown`, on an
error (one line on stderr, which rank 0 quotes), or as soon as rank 0 goes away (its stdin, a pipe from rank 0,
closes).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import IO

import torch
import torch.distributed as dist

from mistral_chat.engine.generate import Session
from mistral_chat.engine.parallel.batch import follow_rows
from mistral_chat.engine.parallel.group import (DEVICE_ENV, RENDEZVOUS_TIMEOUT, ParallelRunError, RankOptions,
                                                cpu_threads_per_rank, describe_failure, init_process_group,
                                                leave_process_group, load_rank)
from mistral_chat.engine.parallel.session import (DECODE, FEED, RESET, REUSE, ROW_CACHE, ROW_RESET, ROW_STEP,
                                                  SHUTDOWN, CommandChannel, share_token)

log = logging.getLogger(__name__)

FOLLOWER_FLAG = "--follower"


def follow(session: Session, channel: CommandChannel) -> None:
    """Repeat rank 0's cache steps on this rank's shard until it sends shutdown.

    A follower knows the prompts' ids but not the answers' (they stay on the GPU): `session.tokens` holds -1 for
    those, and only its length counts here (rank 0 decides what the cache keeps). Continuous batching's calls go
    to `follow_rows` (parallel/batch.py); where a batch took the model's cache since, the session takes it back
    (fresh and empty) before its next prefix reuse, prefill or decode, as rank 0's session does."""
    token = torch.zeros(1, 1, dtype=torch.long, device=session.loaded.device)
    while True:
        op, ids, position = channel.receive()
        if op == SHUTDOWN:
            return
        if op in (ROW_CACHE, ROW_RESET, ROW_STEP):
            follow_rows(session.model, op, ids, position)
            continue
        if op in (FEED, DECODE, REUSE):
            session._claim_cache()
        if op in (FEED, DECODE) and position != len(session.tokens):
            raise ParallelRunError(f"rank 0 fed position {position} but this rank's cache is at "
                                   f"{len(session.tokens)}: the ranks lost step; start again")
        if op == FEED:
            session._feed(ids)
        elif op == DECODE:
            share_token(token, session.model.parallel.group)
            session.decode(token, position)
            session.tokens.append(-1)
        elif op == REUSE:
            session.keep_prefix(position)
        elif op == RESET:
            session.reset()
        else:
            raise ParallelRunError(f"unknown command {op} from rank 0: all ranks must run the same mistral-chat")


def run_follower(dev_type: str, rank: int, world: int, local_rank: int, store: dist.Store | None = None) -> int:
    """A follower's whole life: join, load its shard, follow rank 0, leave. Returns the exit code."""
    if dev_type == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(world))
    commands = init_process_group(dev_type, rank, world, local_rank, store)
    channel = CommandChannel(commands)
    try:
        options: RankOptions | None = channel.share(None)
        if options is None:  # rank 0 failed before loading, and says so itself
            return 0
        error, session = None, None
        try:
            loaded = load_rank(options, dev_type, rank, world, local_rank)
            session = Session(loaded, context_length=options.options.context_length,
                              prefill_chunk=options.prefill_chunk)
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which prints it
            log.debug("rank %d failed to load", rank, exc_info=True)
            error = f"tensor-parallel rank {rank}: {describe_failure(exc)}"
        if any(channel.gather_errors(error)) or session is None:
            return 1 if error else 0
        loaded.enable_fast_all_reduce()
        follow(session, channel)
        return 0
    finally:
        leave_process_group()


def _exit_when_parent_goes(parent_pipe: IO[bytes]) -> None:
    """Block on the pipe from rank 0; it closes when rank 0 exits, however it exits."""
    try:
        while parent_pipe.read(4096):
            pass
    except (OSError, ValueError):
        pass
    os._exit(0)


def follower_main() -> int:
    """A rank spawned by rank 0 (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...); returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format=f"rank {os.environ.get('RANK')} %(levelname)s %(name)s: "
                                                      "%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group: rank 0 decides
    threading.Thread(target=_exit_when_parent_goes, args=(sys.stdin.buffer,), daemon=True).start()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        # a client of rank 0's store (rank 0 hosts it, and env:// would try to host one again)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=RENDEZVOUS_TIMEOUT)
        return run_follower(os.environ.get(DEVICE_ENV, "cpu"), rank, world, int(os.environ.get("LOCAL_RANK", rank)),
                            store)
    except Exception as exc:  # noqa: BLE001 - one line for rank 0 to quote; tracebacks with MISTRAL_CHAT_DEBUG=1
        if os.environ.get("MISTRAL_CHAT_DEBUG") == "1":
            log.exception("rank %d failed", rank)
        sys.stderr.write(f"{describe_failure(exc)}\n")
        return 1


if __name__ == "__main__":
    if FOLLOWER_FLAG not in sys.argv[1:]:
        sys.stderr.write("this module starts tensor-parallel followers for mistral-chat: run `mistral-chat --tp N`\n")
        sys.exit(2)
    code = follower_main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip the interpreter's teardown: its work is done and the group left, and the teardown can crash on the
    # thread still reading stdin or on NCCL, gloo or compiler state (seen after an aborted NCCL group)
    os._exit(code)
