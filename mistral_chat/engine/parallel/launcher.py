"""Start a tensor-parallel run: rank 0 in the calling process (it hosts the UI), the other ranks following it.

`start_parallel_session(RankOptions, world)` spawns world-1 follower processes (`python -m
mistral_chat.engine.parallel.follower --follower`, follower.py), which meet rank 0 over a TCP store on 127.0.0.1,
one GPU a rank (NCCL) or CPU ranks (gloo, for tests). Under torchrun (RANK and WORLD_SIZE already set, any number
of nodes) nothing is spawned: every rank joins env:// and the ranks other than 0 run the follower loop.

Rank 0 gets its `LoadedModel` and a `ParallelSession` (session.py), which mirrors every cache step on the
followers. Rank 0 watches the processes it spawned (`FollowerProcesses`) and turns a dead rank into one
`ParallelRunError` line; followers exit on `shutdown`, on an error, or as soon as rank 0 goes away.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

import mistral_chat
from mistral_chat.engine.loader import LoadedModel
from mistral_chat.engine.parallel.follower import FOLLOWER_FLAG, run_follower
from mistral_chat.engine.parallel.group import (DEVICE_ENV, RENDEZVOUS_TIMEOUT, ParallelRunError, RankOptions,
                                                check_launch, check_model_splits, cpu_threads_per_rank,
                                                describe_failure, device_type, init_process_group,
                                                leave_process_group, load_rank, torchrun_world)
from mistral_chat.engine.parallel.session import CommandChannel, ParallelSession
from mistral_chat.errors import MistralChatError

log = logging.getLogger(__name__)

STUCK_GRACE_S = 3.0  # after a rank dies, how long rank 0 waits for its own collective to fail before exiting


# ---- the processes rank 0 spawned ----------------------------------------------------------------------------


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a child `python -m mistral_chat...`, which must import this very package
    (even when it runs from a source tree that is not installed), plus `extra`."""
    package_root = str(Path(mistral_chat.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
                **extra)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class FollowerProcesses:
    """Ranks 1..N-1 as child processes of rank 0, watched by a thread that notices within 0.1 s when one dies."""

    def __init__(self, world: int, dev_type: str, port: int) -> None:
        self.world = world
        self.failure: str | None = None
        self.busy = False  # rank 0 is inside a collective (set by ParallelSession)
        self.on_stuck: Callable[[str], None] = exit_with_error
        self._stopping = threading.Event()
        self._logs: dict[int, IO[bytes]] = {}
        self.procs: dict[int, subprocess.Popen] = {}
        for rank in range(1, world):
            env = child_environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                                    WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
            env[DEVICE_ENV] = dev_type
            if dev_type == "cpu":
                env["OMP_NUM_THREADS"] = str(cpu_threads_per_rank(world))
            self._logs[rank] = tempfile.TemporaryFile()
            # followers' output would scribble over the TUI: it goes to a file, quoted when a rank fails
            # (MISTRAL_CHAT_DEBUG=1 lets it through to the terminal)
            stderr = None if os.environ.get("MISTRAL_CHAT_DEBUG") == "1" else self._logs[rank]
            self.procs[rank] = subprocess.Popen(
                [sys.executable, "-m", "mistral_chat.engine.parallel.follower", FOLLOWER_FLAG], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr)
        self._watcher = threading.Thread(target=self._watch, name="tp-follower-watch", daemon=True)
        self._watcher.start()

    @property
    def pids(self) -> dict[int, int]:
        return {rank: p.pid for rank, p in self.procs.items()}

    def _watch(self) -> None:
        while not self._stopping.wait(0.1):
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code is None:
                    continue
                self.failure = self._describe(rank, code)
                log.info("%s", self.failure)
                self._handle_stuck()
                return

    def _handle_stuck(self) -> None:
        """A collective on a dead peer may never return (NCCL): give rank 0 a moment, then end the process."""
        deadline = time.monotonic() + STUCK_GRACE_S
        while time.monotonic() < deadline:
            if not self.busy or self._stopping.is_set():
                return
            time.sleep(0.05)
        assert self.failure is not None
        self.kill()
        self.on_stuck(self.failure)

    def _last_error_line(self, rank: int) -> str:
        logfile = self._logs[rank]
        try:
            logfile.seek(0)
            lines = [line.strip() for line in logfile.read().decode(errors="replace").splitlines()]
        except (OSError, ValueError):
            return ""
        lines = [line for line in lines if line]
        return lines[-1] if lines else ""

    def _describe(self, rank: int, code: int) -> str:
        if code < 0:
            hint = " (out of host memory?)" if code == -signal.SIGKILL else ""
            return (f"tensor-parallel rank {rank} was killed by {_signal_name(code)}{hint}, so the run stopped: "
                    "start mistral-chat again")
        last = self._last_error_line(rank)
        return (f"tensor-parallel rank {rank} exited with code {code}" + (f" ({last})" if last else "")
                + ", so the run stopped: fix that and start mistral-chat again")

    def check(self) -> str | None:
        """The failure, looking at the processes now (for callers that hold the GIL in a wait loop)."""
        if self.failure is None:
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code is not None:
                    self.failure = self._describe(rank, code)
                    break
        return self.failure

    def wait_for_failure(self, seconds: float) -> str | None:
        """The failure the watcher found, waiting up to `seconds` for it (a collective error arrives first)."""
        deadline = time.monotonic() + seconds
        while self.failure is None and time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs.values()):
                time.sleep(0.15)  # let the watcher describe it
                continue
            time.sleep(0.05)
        return self.failure

    def stopping(self) -> None:
        """From now on the followers are expected to exit: that is no longer a failure."""
        self._stopping.set()

    def close(self, timeout: float = 10.0) -> None:
        """Wait for the followers to exit (after a shutdown command), killing any that do not."""
        self._stopping.set()
        for proc in self.procs.values():
            if proc.stdin is not None:
                try:
                    proc.stdin.close()  # a follower that missed the shutdown exits on this
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for logfile in self._logs.values():
            logfile.close()

    def kill(self) -> None:
        self._stopping.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()


def exit_with_error(message: str) -> None:
    """Last resort when rank 0 is stuck in a collective with a dead rank: one line on stderr, exit 1."""
    sys.stderr.write(f"mistral-chat: error: {message}\n")
    sys.stderr.flush()
    os._exit(1)


# ---- rank 0 --------------------------------------------------------------------------------------------------


def loopback_store(world: int) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on 127.0.0.1 only.

    `dist.TCPStore("127.0.0.1", 0, is_master=True)` binds its server to every interface (`*:PORT`, IPv4 and IPv6)
    whatever host it is given: the host only says where clients connect. So the socket is bound to loopback here
    and handed over (`master_listen_fd`); the store owns it from then on.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(max(world, 16))
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    fd = sock.detach()
    try:
        return dist.TCPStore("127.0.0.1", port, world, is_master=True, timeout=RENDEZVOUS_TIMEOUT,
                             wait_for_workers=False, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def start_parallel_session(options: RankOptions, world: int | None = None,
                           progress: Callable[[int, int], None] | None = None,
                           on_stuck: Callable[[str], None] | None = None
                           ) -> tuple[LoadedModel, ParallelSession] | None:
    """Start (or, under torchrun, join) a run of `world` ranks; rank 0 gets its model and session.

    Under torchrun the other ranks follow rank 0 inside this call and get None back once it shuts them down.
    `on_stuck(message)` runs when a rank died while rank 0 is blocked in a collective that will not return
    (default: print the message and exit the process; a TUI should restore the terminal first).
    """
    env_world = torchrun_world()
    if env_world is not None:
        if world not in (None, 1, env_world):
            raise ParallelRunError(f"--tp {world} disagrees with torchrun's WORLD_SIZE {env_world}: pass "
                                   f"--tp {env_world} or leave --tp out")
        return _join_torchrun(options, env_world, progress)
    if world is None:
        raise ParallelRunError("no --tp given and not started by torchrun: pass --tp N")
    dev_type = device_type(options.options.device)
    check_launch(world, dev_type)
    check_model_splits(options.path, world)
    store = loopback_store(world)
    followers = FollowerProcesses(world, dev_type, store.port)
    if on_stuck is not None:
        followers.on_stuck = on_stuck
    followers.busy = True  # the rendezvous blocks until every follower joined: a dead one must not hang it
    try:
        commands = init_process_group(dev_type, 0, world, 0, store)
    except RuntimeError as exc:
        followers.busy = False
        failure = followers.wait_for_failure(2.0)
        followers.kill()
        followers.close()
        leave_process_group()
        raise ParallelRunError(failure or f"tensor-parallel ranks could not meet ({exc})") from exc
    finally:
        followers.busy = False
    return _start_rank0(options, world, dev_type, 0, CommandChannel(commands), followers, progress)


def _join_torchrun(options: RankOptions, world: int, progress: Callable[[int, int], None] | None
                   ) -> tuple[LoadedModel, ParallelSession] | None:
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev_type = device_type(options.options.device)
    if rank != 0:
        code = run_follower(dev_type, rank, world, local_rank)
        if code:
            raise ParallelRunError(f"tensor-parallel rank {rank} could not load its shard (see rank 0's message)")
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    check_launch(world, dev_type, local_world)
    commands = init_process_group(dev_type, 0, world, local_rank)
    channel = CommandChannel(commands)
    try:
        check_model_splits(options.path, world)
    except MistralChatError:
        channel.share(None)  # let the followers go before saying why
        leave_process_group()
        raise
    return _start_rank0(options, world, dev_type, local_rank, channel, None, progress)


def _start_rank0(options: RankOptions, world: int, dev_type: str, local_rank: int, channel: CommandChannel,
                 followers: FollowerProcesses | None, progress: Callable[[int, int], None] | None
                 ) -> tuple[LoadedModel, ParallelSession]:
    threads = torch.get_num_threads()
    if dev_type == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(world))
    session: ParallelSession | None = None
    try:
        channel.share(options)
        error: str | None = None
        loaded: LoadedModel | None = None
        try:
            loaded = load_rank(options, dev_type, 0, world, local_rank, progress)
            session = ParallelSession(loaded, channel, followers, options.options.context_length,
                                      options.prefill_chunk)
        except Exception as exc:  # noqa: BLE001 - the followers must hear of it before rank 0 raises
            error = describe_failure(exc)
            cause: BaseException | None = exc
        else:
            cause = None
        errors = channel.gather_errors(error)
        first = next((e for e in errors if e), None)
        if first is not None:
            if followers is not None:
                followers.close()
            leave_process_group()
            if cause is not None and isinstance(cause, MistralChatError):
                raise cause
            raise ParallelRunError(first) from cause
        assert loaded is not None and session is not None
        loaded.enable_fast_all_reduce()
        if dev_type == "cpu":
            session.restore_threads = threads
        log.info("tensor-parallel run of %d ranks on %s ready", world, dev_type)
        return loaded, session
    except RuntimeError as exc:
        failure = followers.wait_for_failure(2.0) if followers is not None else None
        if followers is not None:
            followers.kill()
            followers.close()
        leave_process_group()
        raise ParallelRunError(failure or f"tensor-parallel start failed ({exc})") from exc
    finally:
        if session is None and dev_type == "cpu":
            torch.set_num_threads(threads)
