"""Manual GPU check (not collected by pytest): where the wall time of `mistral-chat batch` goes at one batch size,
beyond the GPU's own work.

Loads a checkpoint folder (e.g. the one `bench --batch-mode --tp-checkpoint DIR` wrote) as the batch command does,
answers `--requests` prompts of `--prompt` tokens (`--steps` tokens each) once to warm up, then again under
cProfile with the model calls timed: the eager prefills (synchronised), the choice of tokens (which waits for the
step's logits), the launch of each step (not synchronised: a step launched ahead still runs while the host works),
and the rest (the host's own work: sampling, detokenizing, events, JSON). Prints those totals and cProfile's top
functions by own time.

    python3 benchmarks/gpu/batch_host.py /dev/shm/mistral-chat-m7 --batch 64
    python3 benchmarks/gpu/batch_host.py DIR --device cpu --requests 32 --prompt 32 --steps 16 --batch 8
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections import defaultdict

import torch

from mistral_chat.api import Model
from mistral_chat.bench.batch_mode import answer_as_batch_command, batch_lines, prompt_texts
from mistral_chat.engine import batch as batch_module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=256)
    a = p.parse_args()
    model = Model.load(a.folder, device=a.device, context=a.prompt + a.steps + 16, compile=False)
    texts = prompt_texts(model.tokenizer, a.requests, a.prompt)
    answer_as_batch_command(model, batch_lines(texts[:a.batch], 4), a.batch)  # warm-up: graphs captured
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    cuda = model.loaded.device.type == "cuda"

    def timed(name, fn, sync=False):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            if cuda and sync:
                torch.cuda.synchronize()
            spent[name] += time.perf_counter() - started
            calls[name] += 1
            return out
        return wrapper

    generator = batch_module.BatchGenerator
    generator._prefill = timed("prefill (eager, synchronised)", generator._prefill, sync=True)
    generator._choose = timed("choosing tokens (waits for the step's logits)", generator._choose)
    generator._run_step = timed("launching a step (not synchronised)", generator._run_step)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    seconds, replies, _ = answer_as_batch_command(model, batch_lines(texts, a.steps), a.batch)
    profiler.disable()
    wall = time.perf_counter() - started
    tokens = sum(r.usage.generated_tokens for r in replies)
    print(f"batch {a.batch}: {a.requests} requests in {seconds:.2f} s ({tokens / seconds:,.0f} tokens/s; "
          f"under cProfile, {wall:.2f} s with its end)")
    for name, value in spent.items():
        print(f"  {name:48} {value:7.2f} s  {calls[name]:6d} calls")
    print(f"  {'the rest (host work not overlapping a step)':48} {seconds - sum(spent.values()):7.2f} s")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(22)
    print(text.getvalue()[-5000:])


if __name__ == "__main__":
    main()
