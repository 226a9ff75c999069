"""Manual GPU check (not collected by pytest): where one batch-1 decode step spends its time.

Builds random weights of a real shape on the device (as `mistral-chat bench` does), decodes a few tokens to
compile, then profiles `--steps` decode steps and prints the kernels by total device time, and the time per
step by kind of kernel (matrix products, attention, collectives, the rest):

    python3 benchmarks/gpu/profile_decode.py --shape mistral-7b [--quantize int8] [--no-compile] [--steps 20]
    python3 benchmarks/gpu/profile_decode.py --shape mistral-7b --plan gemv=triton   # another kernel plan
    python3 benchmarks/gpu/profile_decode.py --shape mistral-7b --prefill-only --prompt 2048 --steps 5   # eager prefill

On a machine without a GPU it runs on the CPU (use `--shape tiny`), which only checks that the script works.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mistral_chat.bench.run import SHAPES, bench_shape, parse_plan
from mistral_chat.engine.decode import DecodeStep, prefill
from mistral_chat.engine.loader import random_model
from mistral_chat.engine.plan import choose_plan

KINDS = (("matrix products", ("gemv", "gemm", "mm", "nvjet", "cutlass", "sm90", "xmma", "splitk", "reduction_n")),
         ("attention", ("softmax", "attention", "flash", "bmm")),
         ("collectives", ("nccl", "allreduce", "all_reduce", "allgather")))


def kind_of(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith("triton_red") and "matmul" in lowered:  # inductor's batch-1 matrix products
        return "matrix products"
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "the rest"


def print_kinds(events, steps: int, wall: float) -> None:
    """Device time per decode step by kind of kernel, from a profiler's `key_averages()`."""
    per_kind: dict[str, float] = defaultdict(float)
    for e in events:  # kernels carry self device time
        us = getattr(e, "self_device_time_total", 0.0)
        # whole graphs, eager operators and launch calls (which carry their kernels' time as their own too)
        if us > 0 and not e.key.startswith(("## Call CompiledFxGraph", "Torch-Compiled Region", "aten::",
                                            "cuLaunch", "cudaLaunch")):
            per_kind[kind_of(e.key)] += us
    total = sum(per_kind.values())
    for kind, us in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:>16}: {us / steps / 1000:.3f} ms per step ({100 * us / max(total, 1):.0f}% of kernel time)")
    print(f"kernel time {total / steps / 1000:.3f} ms per step; wall (profiled) {wall / steps * 1000:.3f} ms")


def print_timeline(prof, steps: int, layers: int) -> None:
    """What each kernel costs inside the pipeline: kernels of one stream end in order, so the time from the previous
    kernel's end to a kernel's end is what it adds to a step, whatever it overlapped before (with programmatic
    dependent launch a kernel starts, and its profiled time begins, while the one before still runs). Prints that
    time per kernel name (mean per call, and per step), then one middle layer's kernels in order."""
    from torch.autograd import DeviceType

    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.time_range.end)
    if len(kernels) < 2:
        return
    added: dict[str, list[float]] = defaultdict(list)
    sequence = []
    for before, e in zip(kernels, kernels[1:]):
        us = e.time_range.end - before.time_range.end
        added[e.name].append(us)
        sequence.append((e.name, us, e.time_range.end - e.time_range.start))
    print(f"time each kernel adds to a step (previous kernel's end to its end), {steps} steps:")
    for name, values in sorted(added.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {sum(values) / steps:8.1f} us/step  {len(values) / steps:5.1f} calls/step  "
              f"{sum(values) / len(values):6.2f} us/call  {name[:90]}")
    per_step = len(sequence) // steps
    start = (steps // 2) * per_step + per_step // 2  # a middle layer of a middle step
    print(f"kernels of one layer in order (~{per_step} kernels a step, {layers} layers): added us, own us, name")
    for name, us, own in sequence[start:start + max(per_step // max(layers, 1), 1) + 2]:
        print(f"  {us:7.2f} {own:7.2f}  {name[:100]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int)
    p.add_argument("--quantize", choices=["int8"])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--prefill-only", action="store_true",
                   help="profile --steps eager prefills of --prompt tokens instead of decode steps")
    p.add_argument("--plan", default="", help="override the kernel plan, e.g. gemv=triton,attention=torch")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = bench_shape(a.shape, a.layers)
    plan = choose_plan(device, torch.bfloat16, 1, a.quantize, not a.no_compile).with_overrides(parse_plan(a.plan),
                                                                                               device)
    print(plan.describe())
    tokens = torch.randint(0, config.vocab_size, (1, a.prompt), device=device)
    plain_logits = None
    if a.prefill_only and plan.fused:  # the plain formulas' logits, to compare (a model of the same weights)
        plain_model = random_model(config, device, torch.bfloat16, a.quantize, dataclasses.replace(plan, fused=False))
        plain_model.setup_cache(a.prompt + 16, prefill_chunk=a.prompt)
        with torch.no_grad():
            plain_logits = plain_model(tokens, 0).float()
        del plain_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model = random_model(config, device, torch.bfloat16, a.quantize, plan)
    # a cache of whole 256-slot buckets, as a chat's long context gives: attention over an odd number of slots
    # (548 here before) made cuBLAS pick slower kernels for its two small products (8.6 and 4.0 us instead of ~3.5)
    model.setup_cache(-(-(a.prompt + a.steps + 16) // 256) * 256, prefill_chunk=a.prompt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if a.prefill_only:
        with torch.no_grad():
            for _ in range(2):
                model(tokens, 0)
            sync()
            if plain_logits is not None:
                fused = model(tokens, 0).float()
                print(f"last logits, fused kernels against the plain formulas: relative difference "
                      f"{((fused - plain_logits).norm() / plain_logits.norm()).item():.2e}, same argmax: "
                      f"{bool((fused.argmax(-1) == plain_logits.argmax(-1)).all())}")
            with profile(activities=activities) as prof:
                started = time.perf_counter()
                for _ in range(a.steps):
                    model(tokens, 0)
                sync()
                wall = time.perf_counter() - started
        print(f"{a.shape} ({config.n_layers} layers, {a.quantize or 'bf16'}) on {device}: eager prefill of "
              f"{a.prompt} tokens, {a.steps} times ('step' below means one prefill)")
        events = prof.key_averages()
        print(events.table(sort_by="device_time_total" if device.type == "cuda" else "cpu_time_total",
                           row_limit=30, max_name_column_width=80))
        if device.type == "cuda":
            print_kinds(events, a.steps, wall)
        return
    step = DecodeStep(model, compile=not a.no_compile)
    logits = prefill(model, tokens, 0)
    position = a.prompt

    def decode(n: int) -> None:
        nonlocal logits, position
        for _ in range(n):
            logits = step(logits.argmax(-1).view(1, 1), position)
            position += 1

    started = time.perf_counter()
    decode(3)
    sync()
    print(f"{a.shape} ({config.n_layers} layers, {a.quantize or 'bf16'}, "
          f"{'eager' if a.no_compile else 'compiled'}) on {device}: warm-up {time.perf_counter() - started:.1f} s")
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        decode(a.steps)
        sync()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(events.table(sort_by=sort, row_limit=25, max_name_column_width=80))
    if device.type == "cuda":
        print_kinds(events, a.steps, wall)
        print_timeline(prof, a.steps, config.n_layers)


if __name__ == "__main__":
    main()
