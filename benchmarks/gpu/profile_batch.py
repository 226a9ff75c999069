"""Manual GPU check (not collected by pytest): where continuous batching's decode step spends its time.

`mistral-chat batch` decodes every row of its cache in one step (`Transformer.forward_rows`, each row at its own
position, captured in CUDA graphs: decode.GraphedRows). bench --batch-mode found that step at batch 64 well below
the raw batched decode (`Transformer.forward`, all rows at one position). This script builds random weights of a
real shape on the device, fills `--batch` rows with `--prompt`-token prompts as a wave of admissions does, then:

  1. times the prefill of the wave (rows together, as BatchGenerator._prefill groups them);
  2. times the graphed row step alone, and with the host's per-step work after it (argmax, copy to the host);
  3. times the raw batched decode step (DecodeStep, the plan's graphs) at the same batch and positions;
  4. profiles both steps, in their graphs, and prints the time each kernel adds to a step, by kind and by name.

    python3 benchmarks/gpu/profile_batch.py --shape mistral-7b --batch 64 --prompt 512 --steps 32
    python3 benchmarks/gpu/profile_batch.py --shape tiny --batch 4 --prompt 16 --steps 4    # CPU: the script works
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_decode import print_kinds, print_timeline  # noqa: E402

from mistral_chat.bench.command import parse_plan  # noqa: E402
from mistral_chat.bench.shapes import SHAPES, bench_shape  # noqa: E402
from mistral_chat.engine.decode import DecodeStep, GraphedRows, key_bucket  # noqa: E402
from mistral_chat.engine.kernels import decode_attention  # noqa: E402
from mistral_chat.engine.loader import random_model  # noqa: E402
from mistral_chat.engine.plan import choose_plan  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_step(fn, steps: int, device: torch.device) -> float:
    """Mean seconds of fn(i) over `steps` calls, after one untimed call, the device synchronised around."""
    fn(0)
    sync(device)
    started = time.perf_counter()
    for i in range(steps):
        fn(i)
    sync(device)
    return (time.perf_counter() - started) / steps


def profiled(fn, steps: int, device: torch.device, layers: int, title: str) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for i in range(steps):
            fn(i)
        sync(device)
        wall = time.perf_counter() - started
    print(f"--- {title}")
    if device.type != "cuda":
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))
        return
    print_kinds(prof.key_averages(), steps, wall)
    print_timeline(prof, steps, layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--chunk", type=int, default=2048, help="prefill tokens a call (the engine's default)")
    p.add_argument("--plan", default="", help="override the kernel plan, e.g. attention=torch")
    p.add_argument("--attention-programs", default="",
                   help="also time the row step with decode_attention.PROGRAMS at each of these values, e.g. "
                        "264,1056,2112 (more programs: the cache's keys split into more ranges)")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = bench_shape(a.shape, a.layers)
    plan = choose_plan(device, dtype, 1, None, False).with_overrides(parse_plan(a.plan), device)
    print(plan.describe())
    model = random_model(config, device, dtype, None, plan)
    context = a.prompt + a.steps * 3 + 16
    b, vocab = a.batch, config.vocab_size
    model.setup_row_cache(context, b, a.chunk)
    prompts = torch.randint(0, vocab, (b, a.prompt), device=device)
    group = max(1, a.chunk // a.prompt)

    def prefill_wave() -> None:
        assert model.row_positions is not None
        model.row_positions.reset()
        for first in range(0, b, group):
            rows = slice(first, min(b, first + group))
            n = rows.stop - rows.start
            model.forward_rows(prompts[rows], torch.zeros(n, dtype=torch.long, device=device), rows, a.prompt)

    prefill_wave()
    sync(device)
    started = time.perf_counter()
    prefill_wave()
    sync(device)
    prefill_s = time.perf_counter() - started
    print(f"{a.shape}, {config.n_layers} layers, {dtype}, {device}: prefill of {b} x {a.prompt} tokens in "
          f"{prefill_s * 1000:.1f} ms ({b * a.prompt / prefill_s:,.0f} tokens/s, {group} rows a call)")

    assert model.row_positions is not None
    capacity = model.row_positions.capacity
    tokens = torch.randint(0, vocab, (b, 1), device=device)
    graphed = GraphedRows(model, b) if device.type == "cuda" else None

    def row_step(i: int) -> torch.Tensor:
        position = a.prompt + i
        starts = torch.full((b,), position, dtype=torch.long)
        if graphed is not None:
            return graphed(tokens.cpu(), starts, key_bucket(position, capacity))
        return model.forward_rows(tokens, starts.to(device), slice(0, b), min(capacity, position + 1))

    def row_step_and_host(i: int) -> list[int]:
        return row_step(i).argmax(-1).tolist()

    rows_s = per_step(row_step, a.steps, device)
    by_programs = {}
    for programs in [int(v) for v in a.attention_programs.split(",") if v]:
        default, decode_attention.PROGRAMS = decode_attention.PROGRAMS, programs
        graphed = GraphedRows(model, b) if device.type == "cuda" else None  # captured anew with these splits
        by_programs[programs] = per_step(row_step, a.steps, device)
        decode_attention.PROGRAMS = default
        graphed = GraphedRows(model, b) if device.type == "cuda" else None
    host_s = per_step(row_step_and_host, a.steps, device)
    profiled(row_step, min(a.steps, 8), device, config.n_layers,
             "row step (forward_rows" + (", graphed)" if graphed is not None else ", eager)"))

    model.setup_cache(context, batch=b, prefill_chunk=a.prompt)
    with torch.no_grad():
        model(prompts, 0)
    step = DecodeStep(model, compile=False)

    def raw_step(i: int) -> torch.Tensor:
        return step(tokens, a.prompt + i)

    raw_s = per_step(raw_step, a.steps, device)
    profiled(raw_step, min(a.steps, 8), device, config.n_layers, "raw batched step (forward, the plan's graphs)")
    print(f"batch {b}, positions {a.prompt}..{a.prompt + a.steps}:")
    print(f"  row step            {rows_s * 1000:7.3f} ms  ({b / rows_s:,.0f} tokens/s)")
    print(f"  row step + host     {host_s * 1000:7.3f} ms  ({b / host_s:,.0f} tokens/s; argmax and .tolist())")
    print(f"  raw batched step    {raw_s * 1000:7.3f} ms  ({b / raw_s:,.0f} tokens/s)")
    for programs, seconds in by_programs.items():
        print(f"  row step, PROGRAMS={programs:<5} {seconds * 1000:7.3f} ms  (decode attention aiming at that many)")
    print(f"  prefill of the wave {prefill_s * 1000:7.1f} ms  ({b * a.prompt / prefill_s:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
