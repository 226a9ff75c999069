"""Where a tensor-parallel rank stands and how it joins and leaves the process group; what every rank loads.

The launcher (rank 0, launcher.py) and the followers (follower.py) share these: the checks before a run starts,
the process group (the model's collectives on the default group, NCCL on GPUs or gloo on the CPU, and a gloo group
of its own for rank 0's commands), each rank's device and CPU threads, and the loading of a rank's shard.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mistral_chat.engine.generate import DEFAULT_PREFILL_CHUNK
from mistral_chat.engine.loader import LoadedModel, load_model
from mistral_chat.engine.options import LoadOptions
from mistral_chat.engine.parallel.collectives import disable_fast_all_reduce
from mistral_chat.engine.parallel.sharding import Parallel, check_tensor_parallel
from mistral_chat.errors import DeviceError, MistralChatError

log = logging.getLogger(__name__)

COMPUTE_TIMEOUT = timedelta(minutes=5)  # one collective of the model waiting for a peer
IDLE_TIMEOUT = timedelta(days=365)  # a follower waiting for rank 0's next command (the user may be away)
RENDEZVOUS_TIMEOUT = timedelta(minutes=2)
DEVICE_ENV = "MISTRAL_CHAT_TP_DEVICE"  # cuda or cpu: set by rank 0 for the followers it spawns


class ParallelRunError(MistralChatError):
    """A tensor-parallel run that could not start, or lost one of its ranks."""


@dataclass(frozen=True)
class RankOptions:
    """What every rank needs to load its shard and build its session; rank 0 sends it to the followers.

    `options.device` is auto, cpu or cuda: rank r uses cuda:LOCAL_RANK. `options.tp` is not read here (the run's
    world size is the launcher's argument, or torchrun's WORLD_SIZE)."""

    path: str
    options: LoadOptions = field(default_factory=LoadOptions)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK


# ---- where this process stands ------------------------------------------------------------------------------


def torchrun_world() -> int | None:
    """WORLD_SIZE when this process was started by torchrun (or another env:// launcher), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def is_torchrun_follower() -> bool:
    """Whether this process is a rank other than 0 of a run started by torchrun."""
    return torchrun_world() is not None and int(os.environ["RANK"]) != 0


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


def rank_device(dev_type: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if dev_type == "cuda" else "cpu"


def cpu_threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


# ---- the process group ---------------------------------------------------------------------------------------


def init_process_group(dev_type: str, rank: int, world: int, local_rank: int, store: dist.Store | None = None) -> Any:
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


def abort_nccl() -> None:
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


def leave_process_group(timeout: float = 15.0) -> None:
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
        abort_nccl()


def _destroy_process_group() -> None:
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit; a broken group must not hide the real error
        log.debug("destroy_process_group failed", exc_info=True)


# ---- every rank's shard --------------------------------------------------------------------------------------


def load_rank(rank_options: RankOptions, dev_type: str, rank: int, world: int, local_rank: int,
              progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Load this rank's shard (the one place all ranks load: --quantize composes here, per shard)."""
    kwargs = rank_options.options.load_kwargs()
    kwargs["device"] = rank_device(dev_type, local_rank)
    return load_model(rank_options.path, parallel=Parallel(rank=rank, world=world), progress=progress, **kwargs)


def describe_failure(exc: BaseException) -> str:
    """One line for what went wrong on a rank (rank 0 quotes the followers' lines)."""
    if isinstance(exc, MistralChatError):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory loading its shard: try --quantize int8, a larger --tp or a smaller model"
    return f"{type(exc).__name__}: {exc}"
