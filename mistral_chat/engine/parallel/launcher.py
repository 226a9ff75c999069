"""Start a tensor-parallel run: rank 0 in the calling process (it hosts the UI), the other ranks following it.

`mistral-chat --tp N` spawns N-1 follower processes itself (`python -m mistral_chat.engine.parallel.launcher --follower`),
rendezvous over a TCP store on 127.0.0.1, one GPU a rank (NCCL) or CPU ranks (gloo, for tests). Under torchrun
(RANK and WORLD_SIZE already set, any number of nodes) nothing is spawned: every rank joins env:// and the ranks
other than 0 run the follower loop.

Rank 0 drives an ordinary `Session` whose cache operations (`reset`, prefix reuse, `feed`) are first broadcast
to the followers, which repeat them on their own shard: every model forward runs on all ranks with the same
tokens. Only rank 0 samples; the token it picked reaches the followers as the next `feed`, so the ranks never
depend on identical random streams, and a cancelled answer simply sends nothing more.

Commands travel on a gloo group of their own with a long timeout (a follower may wait hours for the next
message); the model's collectives use the default group (NCCL on GPUs). Rank 0 watches the processes it spawned
and turns a dead rank into one `ParallelRunError` line; followers exit on `shutdown`, on an error, or as soon as
rank 0 goes away (their stdin, a pipe from rank 0, closes).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mistral_chat.engine.generate import DEFAULT_PREFILL_CHUNK, Session, TokenReader
from mistral_chat.engine.loader import LoadedModel, load_model
from mistral_chat.engine.parallel.collectives import asked_all_reduce, disable_fast_all_reduce, enable_fast_all_reduce
from mistral_chat.engine.parallel.sharding import Parallel, check_tensor_parallel
from mistral_chat.errors import DeviceError, MistralChatError

if TYPE_CHECKING:
    from mistral_chat.cli.main import RunOptions
    from mistral_chat.oneshot import OneShotRequest

log = logging.getLogger(__name__)

COMPUTE_TIMEOUT = timedelta(minutes=5)  # one collective of the model waiting for a peer
IDLE_TIMEOUT = timedelta(days=365)  # a follower waiting for rank 0's next command (the user may be away)
RENDEZVOUS_TIMEOUT = timedelta(minutes=2)
STUCK_GRACE_S = 3.0  # after a rank dies, how long rank 0 waits for its own collective to fail before exiting
FOLLOWER_FLAG = "--follower"
_DEVICE_ENV = "MISTRAL_CHAT_TP_DEVICE"

# command opcodes, sent as the first element of an int64 header [op, n ids, first id, position]
_FEED, _DECODE, _REUSE, _RESET, _SHUTDOWN = 1, 2, 3, 4, 5


class ParallelRunError(MistralChatError):
    """A tensor-parallel run that could not start, or lost one of its ranks."""


@dataclass(frozen=True)
class RankOptions:
    """What every rank needs to load its shard and build its session; rank 0 broadcasts it."""

    path: str
    device: str = "auto"  # auto | cpu | cuda: rank r uses cuda:LOCAL_RANK
    dtype: str = "auto"
    context_length: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    quantize: str | None = None
    lora: str | None = None
    lora_scale: float = 1.0
    compile: bool = False  # on GPUs: decode as CUDA graphs, every rank alike (see decode.py)


# ---- where this process stands ------------------------------------------------------------------------------


def torchrun_world() -> int | None:
    """WORLD_SIZE when this process was started by torchrun (or another env:// launcher), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def device_type(device: str) -> str:
    """`cuda` or `cpu` for a --device value; with --tp the ranks choose their GPU index themselves."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return "cuda"
    if device.startswith("cuda:"):
        raise DeviceError(f"--device {device} names one GPU, but --tp places rank r on cuda:r: pass --device "
                          "cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES")
    raise DeviceError(f"--device {device} is not supported with --tp: use auto, cpu or cuda")


def check_launch(world: int, dev_type: str, local_world: int | None = None) -> None:
    """DeviceError / ParallelRunError when this machine cannot run `world` ranks on `dev_type`."""
    if world < 2:
        raise ParallelRunError(f"--tp {world} needs no parallel run: use --tp 2 or more")
    if not dist.is_available():
        raise ParallelRunError("this torch build has no torch.distributed: install the official torch wheels "
                               "to use --tp")
    if not dist.is_gloo_available():
        raise ParallelRunError("this torch build lacks the gloo backend, which --tp uses for its commands: "
                               "install the official torch wheels")
    if dev_type != "cuda":
        return
    if not torch.cuda.is_available():
        raise DeviceError("--device cuda asked for, but no CUDA GPU is usable here: use --device cpu, or install "
                          "a CUDA build of torch")
    if not dist.is_nccl_available():
        raise DeviceError("this torch build has no NCCL, which --tp needs on GPUs: install a CUDA build of torch "
                          "from pytorch.org (Linux)")
    here = local_world or world
    if here > torch.cuda.device_count():
        raise DeviceError(f"--tp {world} needs {here} GPUs on this machine but {torch.cuda.device_count()} "
                          "are visible: lower --tp, or check CUDA_VISIBLE_DEVICES")


def check_model_splits(path: str | Path, world: int) -> None:
    """ParallelRunError unless the model at `path` can be split over `world` ranks (read from its config)."""
    from mistral_chat.engine.config import load_config

    c = load_config(Path(path))
    try:
        check_tensor_parallel(world, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size)
    except MistralChatError as exc:
        raise ParallelRunError(f"{Path(path).name}: {exc}") from None


def _rank_device(dev_type: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if dev_type == "cuda" else "cpu"


def _init_process_group(dev_type: str, rank: int, world: int, local_rank: int,
                        store: dist.Store | None = None) -> Any:
    """Join the default group (the model's collectives) and return the gloo group that carries commands."""
    if dev_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if dev_type == "cuda" else "gloo"
    if store is None:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=COMPUTE_TIMEOUT)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=COMPUTE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def _cpu_threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


# ---- commands from rank 0 to the followers -------------------------------------------------------------------


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


# ---- the processes rank 0 spawned ----------------------------------------------------------------------------


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a child `python -m mistral_chat...`, which must import this very package
    (even when it runs from a source tree that is not installed), plus `extra`."""
    package_root = str(Path(__file__).resolve().parents[2])
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
            env[_DEVICE_ENV] = dev_type
            if dev_type == "cpu":
                env["OMP_NUM_THREADS"] = str(_cpu_threads_per_rank(world))
            self._logs[rank] = tempfile.TemporaryFile()
            # followers' output would scribble over the TUI: it goes to a file, quoted when a rank fails
            # (MISTRAL_CHAT_DEBUG=1 lets it through to the terminal)
            stderr = None if os.environ.get("MISTRAL_CHAT_DEBUG") == "1" else self._logs[rank]
            self.procs[rank] = subprocess.Popen(
                [sys.executable, "-m", "mistral_chat.engine.parallel.launcher", FOLLOWER_FLAG], env=env,
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


# ---- rank 0's session ----------------------------------------------------------------------------------------


class ParallelSession(Session):
    """A `Session` on rank 0 of a tensor-parallel group: same interface, every cache step mirrored on all ranks.

    `close()` (or leaving a `with` block) shuts the followers down; a dead rank raises `ParallelRunError`.
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
            self.channel.send(_RESET)
        super().reset()

    def _reuse(self, prompt: Sequence[int]) -> int:
        keep = super()._reuse(prompt)
        with self._collective():
            self.channel.send(_REUSE, position=keep)
        return keep

    def _feed(self, ids: Sequence[int]) -> torch.Tensor:
        with self._collective():
            self.channel.send(_FEED, ids, len(self.tokens))
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
                self.channel.send(_SHUTDOWN)
            except RuntimeError:
                log.debug("shutdown broadcast failed", exc_info=True)
        if self.failure is not None and self.loaded.device.type == "cuda":
            _abort_nccl()  # a collective with the dead rank may still be pending on the GPU
        else:
            _leave_process_group()  # while the followers leave too: NCCL's teardown can wait for every rank
        if self.followers is not None:
            self.followers.close()
        if self.restore_threads is not None:
            torch.set_num_threads(self.restore_threads)

    def __enter__(self) -> "ParallelSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _abort_nccl() -> None:
    """Abort the NCCL communicators (pending collectives end) without waiting more than a few seconds."""
    from torch.distributed.distributed_c10d import _abort_process_group

    def abort() -> None:
        try:
            _abort_process_group()
        except Exception:  # noqa: BLE001 - best effort: the process is about to report the failure and exit
            log.debug("NCCL abort failed", exc_info=True)

    thread = threading.Thread(target=abort, name="tp-nccl-abort", daemon=True)
    thread.start()
    thread.join(5.0)


def _leave_process_group(timeout: float = 15.0) -> None:
    """Destroy the process group, every rank at about the same time.

    With NCCL, first drop this thread's CUDA graphs (compiled decode captured NCCL work in them), and give the
    teardown `timeout` seconds before aborting the communicators instead: seen on H100s and H200s, rank 0
    waited forever in `destroy_process_group` after compiled tensor-parallel decode.
    """
    if not dist.is_initialized():
        return
    if dist.get_backend() != "nccl":
        _destroy_process_group()
        return
    from torch._inductor.cudagraph_trees import reset_cudagraph_trees

    reset_cudagraph_trees()
    disable_fast_all_reduce()
    gc.collect()
    thread = threading.Thread(target=_destroy_process_group, name="tp-leave", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        log.info("leaving the NCCL process group took over %.0f s: aborting it", timeout)
        _abort_nccl()


def _destroy_process_group() -> None:
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit; a broken group must not hide the real error
        log.debug("destroy_process_group failed", exc_info=True)


def share_token(token: torch.Tensor, group: Any) -> None:
    """Rank 0's token ([1, 1] ids on the model's device) into `token` on every rank: a broadcast in the device's
    queue, so neither rank 0 nor a follower waits for the GPU to know it."""
    dist.broadcast(token, src=0, group=group)


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
            self.session.channel.send(_DECODE, position=position)
            tokens = tokens.reshape(1, 1).contiguous()
            share_token(tokens, self.session.model.parallel.group)
            out = self.step(tokens, position)
            return out if self.session.run_ahead else self.session._settle(out)

    def __getattr__(self, name: str) -> Any:  # compiled, cuda_graphs, ... of the wrapped step
        return getattr(self.step, name)


# ---- followers -----------------------------------------------------------------------------------------------


def follow(session: Session, channel: CommandChannel) -> None:
    """Repeat rank 0's cache steps on this rank's shard until it sends shutdown.

    A follower knows the prompts' ids but not the answers' (they stay on the GPU): `session.tokens` holds -1 for
    those, and only its length counts here (rank 0 decides what the cache keeps)."""
    token = torch.zeros(1, 1, dtype=torch.long, device=session.loaded.device)
    while True:
        op, ids, position = channel.receive()
        if op == _SHUTDOWN:
            return
        if op in (_FEED, _DECODE) and position != len(session.tokens):
            raise ParallelRunError(f"rank 0 fed position {position} but this rank's cache is at "
                                   f"{len(session.tokens)}: the ranks lost step; start again")
        if op == _FEED:
            session._feed(ids)
        elif op == _DECODE:
            share_token(token, session.model.parallel.group)
            session.decode(token, position)
            session.tokens.append(-1)
        elif op == _REUSE:
            session.keep_prefix(position)
        elif op == _RESET:
            session.reset()
        else:
            raise ParallelRunError(f"unknown command {op} from rank 0: all ranks must run the same mistral-chat")


def _exit_when_parent_goes(parent_pipe: IO[bytes]) -> None:
    """Block on the pipe from rank 0; it closes when rank 0 exits, however it exits."""
    try:
        while parent_pipe.read(4096):
            pass
    except (OSError, ValueError):
        pass
    os._exit(0)


def _load_rank(options: RankOptions, dev_type: str, rank: int, world: int, local_rank: int,
               progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Load this rank's shard (the one place all ranks load: --quantize composes here, per shard)."""
    return load_model(options.path, device=_rank_device(dev_type, local_rank), dtype=options.dtype,
                      parallel=Parallel(rank=rank, world=world), progress=progress, quantize=options.quantize,
                      lora=options.lora, lora_scale=options.lora_scale, context_length=options.context_length,
                      compile=options.compile)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MistralChatError):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory loading its shard: try --quantize int8, a larger --tp or a smaller model"
    return f"{type(exc).__name__}: {exc}"


def run_follower(dev_type: str, rank: int, world: int, local_rank: int, store: dist.Store | None = None) -> int:
    """A follower's whole life: join, load its shard, follow rank 0, leave. Returns the exit code."""
    if dev_type == "cpu":
        torch.set_num_threads(_cpu_threads_per_rank(world))
    commands = _init_process_group(dev_type, rank, world, local_rank, store)
    channel = CommandChannel(commands)
    try:
        options = channel.share(None)
        if options is None:  # rank 0 failed before loading, and says so itself
            return 0
        error, session = None, None
        try:
            loaded = _load_rank(RankOptions(**options), dev_type, rank, world, local_rank)
            session = Session(loaded, context_length=options["context_length"],
                              prefill_chunk=options["prefill_chunk"])
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which prints it
            log.debug("rank %d failed to load", rank, exc_info=True)
            error = f"tensor-parallel rank {rank}: {_describe(exc)}"
        if any(channel.gather_errors(error)) or session is None:
            return 1 if error else 0
        enable_fast_all_reduce(loaded.model.parallel, loaded.device, loaded.dtype)
        follow(session, channel)
        return 0
    finally:
        _leave_process_group()


def follower_main() -> int:
    """`python -m mistral_chat.engine.parallel.launcher --follower`: a rank spawned by rank 0 (env: RANK, WORLD_SIZE, ...)."""
    logging.basicConfig(level=logging.WARNING, format=f"rank {os.environ.get('RANK')} %(levelname)s %(name)s: "
                                                      "%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group: rank 0 decides
    threading.Thread(target=_exit_when_parent_goes, args=(sys.stdin.buffer,), daemon=True).start()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        # a client of rank 0's store (rank 0 hosts it, and env:// would try to host one again)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=RENDEZVOUS_TIMEOUT)
        return run_follower(os.environ.get(_DEVICE_ENV, "cpu"), rank, world, int(os.environ.get("LOCAL_RANK", rank)),
                            store)
    except Exception as exc:  # noqa: BLE001 - one line for rank 0 to quote; tracebacks with MISTRAL_CHAT_DEBUG=1
        if os.environ.get("MISTRAL_CHAT_DEBUG") == "1":
            log.exception("rank %d failed", rank)
        sys.stderr.write(f"{_describe(exc)}\n")
        return 1


# ---- rank 0 --------------------------------------------------------------------------------------------------


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
    dev_type = device_type(options.device)
    check_launch(world, dev_type)
    check_model_splits(options.path, world)
    asked_all_reduce()  # a misspelt MISTRAL_CHAT_TP_ALL_REDUCE fails here, not after every rank loaded
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=RENDEZVOUS_TIMEOUT,
                          wait_for_workers=False)
    followers = FollowerProcesses(world, dev_type, store.port)
    if on_stuck is not None:
        followers.on_stuck = on_stuck
    followers.busy = True  # the rendezvous blocks until every follower joined: a dead one must not hang it
    try:
        commands = _init_process_group(dev_type, 0, world, 0, store)
    except RuntimeError as exc:
        followers.busy = False
        failure = followers.wait_for_failure(2.0)
        followers.kill()
        followers.close()
        _leave_process_group()
        raise ParallelRunError(failure or f"tensor-parallel ranks could not meet ({exc})") from exc
    finally:
        followers.busy = False
    return _start_rank0(options, world, dev_type, 0, CommandChannel(commands), followers, progress)


def _join_torchrun(options: RankOptions, world: int, progress: Callable[[int, int], None] | None
                   ) -> tuple[LoadedModel, ParallelSession] | None:
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev_type = device_type(options.device)
    if rank != 0:
        code = run_follower(dev_type, rank, world, local_rank)
        if code:
            raise ParallelRunError(f"tensor-parallel rank {rank} could not load its shard (see rank 0's message)")
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    check_launch(world, dev_type, local_world)
    commands = _init_process_group(dev_type, 0, world, local_rank)
    channel = CommandChannel(commands)
    try:
        check_model_splits(options.path, world)
    except MistralChatError:
        channel.share(None)  # let the followers go before saying why
        _leave_process_group()
        raise
    return _start_rank0(options, world, dev_type, local_rank, channel, None, progress)


def _start_rank0(options: RankOptions, world: int, dev_type: str, local_rank: int, channel: CommandChannel,
                 followers: FollowerProcesses | None, progress: Callable[[int, int], None] | None
                 ) -> tuple[LoadedModel, ParallelSession]:
    threads = torch.get_num_threads()
    if dev_type == "cpu":
        torch.set_num_threads(_cpu_threads_per_rank(world))
    session: ParallelSession | None = None
    try:
        channel.share(asdict(options))
        error: str | None = None
        loaded: LoadedModel | None = None
        try:
            loaded = _load_rank(options, dev_type, 0, world, local_rank, progress)
            session = ParallelSession(loaded, channel, followers, options.context_length, options.prefill_chunk)
        except Exception as exc:  # noqa: BLE001 - the followers must hear of it before rank 0 raises
            error = _describe(exc)
            cause: BaseException | None = exc
        else:
            cause = None
        errors = channel.gather_errors(error)
        first = next((e for e in errors if e), None)
        if first is not None:
            if followers is not None:
                followers.close()
            _leave_process_group()
            if cause is not None and isinstance(cause, MistralChatError):
                raise cause
            raise ParallelRunError(first) from cause
        assert loaded is not None and session is not None
        enable_fast_all_reduce(loaded.model.parallel, loaded.device, loaded.dtype)
        if dev_type == "cpu":
            session.restore_threads = threads
        log.info("tensor-parallel run of %d ranks on %s ready", world, dev_type)
        return loaded, session
    except RuntimeError as exc:
        failure = followers.wait_for_failure(2.0) if followers is not None else None
        if followers is not None:
            followers.kill()
            followers.close()
        _leave_process_group()
        raise ParallelRunError(failure or f"tensor-parallel start failed ({exc})") from exc
    finally:
        if session is None and dev_type == "cpu":
            torch.set_num_threads(threads)


def rank_options(opts: "RunOptions", path: str | Path) -> RankOptions:
    from mistral_chat.oneshot import compile_wanted

    lora = getattr(opts, "lora", None)
    return RankOptions(path=str(path), device=opts.device, dtype=opts.dtype, context_length=opts.context,
                       quantize=getattr(opts, "quantize", None), lora=str(lora) if lora else None,
                       lora_scale=getattr(opts, "lora_scale", 1.0),
                       compile=compile_wanted(opts))


def start_parallel(opts: "RunOptions", progress: Callable[[int, int], None] | None = None,
                   on_stuck: Callable[[str], None] | None = None
                   ) -> tuple[LoadedModel, ParallelSession] | None:
    """The TUI's entry: rank 0 gets (its LoadedModel, a ParallelSession); a torchrun follower gets None."""
    if torchrun_world() is not None and int(os.environ["RANK"]) != 0:  # follows rank 0's options, path included
        return start_parallel_session(rank_options(opts, ""), opts.tp, progress, on_stuck)
    from mistral_chat.oneshot import resolve_model_path

    return start_parallel_session(rank_options(opts, resolve_model_path(opts.model)), opts.tp, progress, on_stuck)


def run_parallel_one_shot(opts: "RunOptions", request: "OneShotRequest") -> None:
    """`--prompt` with `--tp N`: rank 0 prints the answer, the followers print nothing."""
    from mistral_chat.oneshot import answer_once

    started = start_parallel(opts)
    if started is None:
        return
    loaded, session = started
    with session:
        if opts.verbose:
            sys.stderr.write(f"loaded {loaded.name} on {session.world} ranks ({loaded.device.type}) as "
                             f"{str(loaded.dtype).removeprefix('torch.')} in {loaded.load_seconds:.1f} s\n")
        answer_once(opts, loaded, session, request)


class ParallelModelLoader:
    """Hooks for `EngineWorker(loader=..., session_factory=...)` that load models as tensor-parallel runs.

    Loading another model shuts the previous run's followers down first; `close()` ends the last run.
    """

    def __init__(self, world: int | None, on_stuck: Callable[[str], None] | None = None) -> None:
        self.world = world
        self.on_stuck = on_stuck
        self.session: ParallelSession | None = None

    def load(self, request: Any, progress: Callable[[int, int], None]) -> LoadedModel:
        """`request` is a worker LoadRequest (path, device, dtype, context_length)."""
        self.close()
        options = RankOptions(path=str(request.path), device=request.device, dtype=request.dtype,
                              context_length=request.context_length,
                              quantize=getattr(request, "quantize", None),
                              lora=str(request.lora) if getattr(request, "lora", None) else None,
                              lora_scale=getattr(request, "lora_scale", 1.0),
                              compile=getattr(request, "compile", False))
        started = start_parallel_session(options, self.world, progress, self.on_stuck)
        if started is None:
            raise ParallelRunError("this process is a tensor-parallel follower and hosts no UI")
        loaded, self.session = started
        return loaded

    def session_factory(self, loaded: LoadedModel, context_length: int | None) -> ParallelSession:
        assert self.session is not None and self.session.loaded is loaded, "call load first"
        return self.session

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


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
