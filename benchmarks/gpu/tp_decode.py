"""Manual multi-GPU check (not collected by pytest): tensor-parallel decode without the launcher.

Each rank, started by torchrun, loads its shard of a checkpoint, prefills a prompt eagerly, then times decode
eager and compiled (CUDA graphs), printing how long each of the first compiled calls takes. It separates the
engine's compiled collectives from `--tp`'s launcher (command broadcasts, followers) when tensor-parallel decode
is slow or stuck; run it with PYTHONFAULTHANDLER=1 and send SIGABRT to see where each rank stands:

    python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/gpu/tp_decode.py /dev/shm/mistral-chat-m7 [--profile]
    ... benchmarks/gpu/tp_decode.py /dev/shm/mistral-chat-m7 --plan all_reduce=symmetric   # another kernel plan

On a machine without GPUs it runs on the CPU over gloo (use a tiny model), which only checks the script.
The checkpoint is one that `mistral-chat bench --tp ... --tp-checkpoint FOLDER` wrote (or any model folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from mistral_chat.bench.run import parse_plan
from mistral_chat.engine.decode import DecodeStep, prefill
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.parallel.collectives import fast_all_reduce_kernel
from mistral_chat.engine.parallel.group import leave_process_group
from mistral_chat.engine.parallel.sharding import Parallel


def say(rank: int, text: str) -> None:
    print(f"[rank {rank} {time.strftime('%H:%M:%S')}] {text}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(step: DecodeStep, token: torch.Tensor, position: int, n: int, read: bool = False) -> float:
    """Milliseconds per decode step; with `read`, the host reads each step's top token before queuing the next
    (as `--tp`'s rank 0 does to send it), otherwise the steps queue back to back."""
    sync()
    started = time.perf_counter()
    for i in range(n):
        out = step(token, position + i)
        if read:
            int(out.argmax())
    sync()
    return (time.perf_counter() - started) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="then profile 20 compiled steps; rank 0 prints "
                                                                "its kernels' device time by kind")
    parser.add_argument("--launcher", action="store_true", help="then time the compiled step with what `--tp`'s "
                                                                 "launcher adds to it, one piece at a time")
    parser.add_argument("--plan", default="", help="override the kernel plan, e.g. all_reduce=c10d or "
                                                   "gemv=torch,norms_in_products=0 (fields: docs/engine.md)")
    args = parser.parse_args()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=device)
    else:  # only checks that the script runs (use a tiny model)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    say(rank, "joined")
    loaded = load_model(args.path, device=str(device), dtype="bfloat16", parallel=Parallel(rank=rank, world=world),
                        plan_overrides=parse_plan(args.plan))
    model = loaded.model
    loaded.enable_fast_all_reduce()  # the plan's all-reduce kernel (c10d where symmetric memory fails)
    kernel = fast_all_reduce_kernel()
    say(rank, f"all-reduces through {f'symmetric memory, {kernel} kernel' if kernel else 'NCCL'}")
    if rank == 0:
        say(rank, loaded.plan.describe())
    context = args.prompt + 4 * args.steps + 16
    model.setup_cache(context, prefill_chunk=512)
    ids = torch.randint(1000, 20000, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    logits = prefill(model, ids, 0)
    token = logits.argmax(-1).view(1, 1)
    say(rank, "loaded and prefilled")
    position = args.prompt
    eager = DecodeStep(model, compile=False)
    with torch.no_grad():
        eager(token, position)
        eager_ms = timed_steps(eager, token, position, 16)
    say(rank, f"eager decode {eager_ms:.2f} ms/step")
    compiled = DecodeStep(model, compile=True)
    for i in range(5):
        started = time.perf_counter()
        out = compiled(token, position + i)
        sync()
        say(rank, f"compiled call {i}: {time.perf_counter() - started:.2f} s")
    compiled_ms = timed_steps(compiled, token, position, args.steps)
    read_ms = timed_steps(compiled, token, position, args.steps, read=True)
    diff = float((out - eager(token, position + 4)).abs().max())
    say(rank, f"compiled decode {compiled_ms:.2f} ms/step back to back, {read_ms:.2f} ms/step reading each token; "
              f"last logits sum {float(out.float().sum()):.8g}, differ from eager by at most {diff:.3g}")
    say(rank, f"autotuned configurations: {tuned_configs()}")
    if args.launcher:
        launcher_costs(rank, compiled, token, position, args.steps)
    if args.profile:
        profile_steps(rank, compiled, token, position)
    dist.barrier()
    leave_process_group()


def tuned_configs() -> str:
    """The configuration this process's autotuning picked for each product shape (the GEMV and experts kernels):
    runs can differ in them, and so in speed and in their logits' last bits."""
    from mistral_chat.engine.kernels import experts_gemv, gemv

    picked = []
    for kernel in (gemv._gemv_kernel, experts_gemv._experts_kernel) if gemv.triton is not None else ():
        for key, config in kernel.cache.items():
            shape = ",".join(str(k) for k in key[:len(kernel.keys)])
            picked.append(f"{kernel.fn.__name__.strip('_')}({shape}) {config.kwargs['BLOCK_N']}x"
                          f"{config.kwargs['BLOCK_K']} w{config.num_warps} s{config.num_stages}")
    return "; ".join(picked) or "none"


def launcher_costs(rank: int, step: DecodeStep, token: torch.Tensor, position: int, n: int) -> None:
    """Milliseconds per compiled step as `--tp`'s rank 0 and followers run it (session.py, follower.py), adding
    one piece per line: the argmax fed back as the next token, the host reading each token one step behind
    (TokenReader), the NCCL broadcast of the token (share_token), the gloo command (CommandChannel)."""
    from mistral_chat.engine.generate import TokenReader
    from mistral_chat.engine.parallel.session import DECODE, CommandChannel, share_token

    commands = CommandChannel(dist.new_group(backend="gloo"))
    group = step.model.parallel.group
    pieces = ["argmax", "read", "share", "command"]

    def run(upto: int) -> float:
        used = set(pieces[:upto])
        reader = TokenReader(token.device)
        current = token.clone()
        sync()
        started = time.perf_counter()
        out = step(current, position)
        for i in range(1, n):
            if "argmax" in used:
                current = out.argmax(-1).view(1, 1)
            if "read" in used:
                reader.start(current)
            if "command" in used:
                if rank == 0:
                    commands.send(DECODE, position=position + i)
                else:
                    commands.receive()
            if "share" in used:
                share_token(current, group)
            out = step(current, position + i)
            if "read" in used:
                reader.value()
        sync()
        return (time.perf_counter() - started) / n * 1e3

    for upto in range(len(pieces) + 1):
        run(upto)  # warm up (the NCCL broadcast's first call sets up its channel)
        ms = run(upto)
        say(rank, f"step{''.join(' + ' + piece for piece in pieces[:upto])}: {ms:.3f} ms/step")


def profile_steps(rank: int, step: DecodeStep, token: torch.Tensor, position: int, n: int = 20) -> None:
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_decode import print_kinds, print_timeline

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        started = time.perf_counter()
        for i in range(n):
            step(token, position + i)
        sync()
        wall = time.perf_counter() - started
    if rank == 0:
        events = prof.key_averages()
        print(events.table(sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=20,
                           max_name_column_width=70), flush=True)
        if cuda:
            print_kinds(events, n, wall)
            print_timeline(prof, n, step.model.config.n_layers)


if __name__ == "__main__":
    main()
