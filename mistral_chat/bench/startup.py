"""`mistral-chat bench --startup`: how long from launch until the first answer comes, and until it comes at full
speed, measured from outside, as a user meets it.

A random checkpoint of the chosen shape is written once (or reused from --tp-checkpoint DIR). Then each run is a
fresh process, `python -m mistral_chat.cli.main --model DIR --prompt ... --max-tokens N --temperature 0 -v`, whose
stdout is read unbuffered: every chunk's arrival time after launch is kept. The runs:

- cold: an empty MISTRAL_CHAT_HOME (so an empty inductor cache, TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR there);
- warm: the same home again (what every later start-up meets);
- no-compile (with --no-compile): the warm home and the CLI's --no-compile;
- unwarmed (with --no-warmup): another empty home, and the engine's kernel warm-up left out (bench/unwarmed.py), so
  that the cold run's Triton compiles happen as the answer first runs each kernel: what the warm-up saves.

From the arrival times: the first byte; "full speed", the time after which every window of the answer's tokens
comes at >= 90% of the steady rate (the rate over the last quarter of the answer); and the whole run (process
exit). Tokens are placed along the byte stream in proportion (the -v statistics give the count), which is exact
enough for random-word tokens of a few bytes each. Nothing here imports the engine: only the CLI is measured, so
a change of the decode path needs no change here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mistral_chat.bench.command import BenchArgs
from mistral_chat.bench.shapes import bench_shape

FULL_SPEED = 0.9  # "full speed": at least this share of the steady rate
PROMPT = "Write a long story about a lighthouse keeper and the sea."
STATS = re.compile(r"generated (\d+), first token (\d+) ms, ([\d.]+) tokens/s, finish: (\w+)")
LOADED = re.compile(r"loaded .* in ([\d.]+) s")


@dataclass
class StartupRun:
    """One fresh process, timed from its launch."""

    name: str
    status: str = "ok"  # ok | failed: STDERR TAIL
    first_byte_s: float | None = None
    full_speed_s: float | None = None
    done_s: float | None = None  # the last byte of the answer
    exit_s: float | None = None  # the process ended
    load_s: float | None = None  # from -v
    tokens: int = 0
    cli_tokens_per_s: float | None = None  # -v's figure over the whole answer
    steady_tokens_per_s: float | None = None  # the last quarter of the answer
    arrivals: list[tuple[float, int]] = field(default_factory=list, repr=False)  # (seconds, bytes so far)


def token_times(arrivals: list[tuple[float, int]], tokens: int) -> list[float]:
    """When each of `tokens` tokens arrived, spreading them along the bytes (arrivals: cumulative byte counts)."""
    total = arrivals[-1][1] if arrivals else 0
    if not tokens or not total:
        return []
    times: list[float] = []
    chunk = 0
    for i in range(tokens):
        byte = (i + 1) * total / tokens  # token i ends at about this byte
        while chunk < len(arrivals) - 1 and arrivals[chunk][1] < byte - 1e-9:
            chunk += 1
        times.append(arrivals[chunk][0])
    return times


def full_speed(times: list[float], share: float = FULL_SPEED) -> tuple[float | None, float | None]:
    """(steady tokens/s over the last quarter, the time after which every window of tokens comes at >= `share` of
    it). None where the answer is too short to tell."""
    n = len(times)
    if n < 8:
        return None, None
    quarter = max(n // 4, 2)
    span = times[-1] - times[-quarter]
    if span <= 0:
        return None, None
    steady = (quarter - 1) / span
    window = max(4, n // 16)
    start = 0  # the first token of the tail that keeps up; a slow window later moves it past that window
    for i in range(n - window):
        seconds = times[i + window] - times[i]
        if seconds > 0 and window / seconds < share * steady:
            start = i + 1
    return steady, times[min(start, n - 1)]


def read_stream(stream, arrivals: list[tuple[float, int]], launched: float) -> None:  # noqa: ANN001 - a pipe
    total = 0
    fd = stream.fileno()
    while True:
        data = os.read(fd, 65536)
        if not data:
            return
        total += len(data)
        arrivals.append((time.perf_counter() - launched, total))


def launch(name: str, model: Path, home: Path, a: BenchArgs, extra: list[str], warmup: bool = True) -> StartupRun:
    """One `mistral-chat --prompt` in a fresh process with `home` as its MISTRAL_CHAT_HOME; without `warmup`, with
    the engine's kernel warm-up left out."""
    env = dict(os.environ, MISTRAL_CHAT_HOME=str(home), TORCHINDUCTOR_CACHE_DIR=str(home / "compile-cache"),
               TRITON_CACHE_DIR=str(home / "triton-cache"), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    cli = "mistral_chat.cli.main" if warmup else "mistral_chat.bench.unwarmed"
    command = [sys.executable, "-m", cli, "--model", str(model), "--prompt", PROMPT,
               "--max-tokens", str(a.steps), "--temperature", "0", "--device", a.device, "--dtype", a.dtype, "-v",
               *(["--quantize", a.quantize] if a.quantize else []), *extra]
    run = StartupRun(name)
    launched = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, bufsize=0)
    reader = threading.Thread(target=read_stream, args=(process.stdout, run.arrivals, launched), daemon=True)
    reader.start()
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    code = process.wait()
    reader.join()
    run.exit_s = time.perf_counter() - launched
    stats = STATS.search(stderr)
    if code != 0 or stats is None:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        run.status = f"failed ({code}): {tail}"
        return run
    loaded = LOADED.search(stderr)
    run.load_s = float(loaded.group(1)) if loaded else None
    run.tokens = int(stats.group(1))
    run.cli_tokens_per_s = float(stats.group(3))
    if run.arrivals:
        run.first_byte_s = run.arrivals[0][0]
        run.done_s = run.arrivals[-1][0]
        run.steady_tokens_per_s, run.full_speed_s = full_speed(token_times(run.arrivals, run.tokens))
    return run


def _seconds(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def format_startup(shape: str, runs: list[StartupRun], checkpoint: str) -> str:
    lines = [f"start-up of `mistral-chat --prompt` ({shape}, {checkpoint}); seconds from launch",
             f"{'run':<11} {'load':>6} {'1st byte':>9} {'full speed':>11} {'answer done':>12} {'exit':>6} "
             f"{'tokens':>7} {'tok/s (-v)':>11} {'steady tok/s':>13}"]
    for r in runs:
        if r.status != "ok":
            lines.append(f"{r.name:<11} {r.status}")
            continue
        lines.append(f"{r.name:<11} {_seconds(r.load_s):>6} {_seconds(r.first_byte_s):>9} "
                     f"{_seconds(r.full_speed_s):>11} {_seconds(r.done_s):>12} {_seconds(r.exit_s):>6} {r.tokens:>7} "
                     f"{r.cli_tokens_per_s or 0:>11.1f} {r.steady_tokens_per_s or 0:>13.1f}")
    lines.append(f"full speed: every later window of tokens at >= {FULL_SPEED:.0%} of the steady rate "
                 "(the answer's last quarter)")
    return "\n".join(lines)


def write_checkpoint(a: BenchArgs, folder: Path) -> bool:
    """The random checkpoint of the args' shape in `folder` (reused when it matches); True if it was reused."""
    from mistral_chat.bench.checkpoint import clear_checkpoint, reusable, write_random_checkpoint
    from mistral_chat.engine.loader import DTYPES

    config = bench_shape(a.shape, a.layers, a.window)
    if reusable(folder, config):
        return True
    clear_checkpoint(folder)
    device = "cuda" if a.device != "cpu" and _has_cuda() else "cpu"
    write_random_checkpoint(folder, config, DTYPES[a.dtype], device=device)
    return False


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_startup(a: BenchArgs) -> int:
    """Write (or reuse) the checkpoint, time the cold, warm (and no-compile) runs, print the table or JSON."""
    import json
    from dataclasses import asdict

    scratch = Path(tempfile.mkdtemp(prefix="mistral-chat-startup-"))
    try:
        folder = Path(a.tp_checkpoint) if a.tp_checkpoint else scratch / "checkpoint"
        print(f"writing the random {a.shape} checkpoint to {folder} ...", file=sys.stderr, flush=True)
        reused = write_checkpoint(a, folder)
        home = scratch / "home"
        runs: list[StartupRun] = []
        plan = [("cold", home, []), ("warm", home, [])]
        plan += [("no-compile", home, ["--no-compile"])] if a.no_compile else []
        plan += [("unwarmed", scratch / "home-unwarmed", [])] if a.no_warmup else []
        for name, run_home, extra in plan:
            print(f"run {name} ...", file=sys.stderr, flush=True)
            runs.append(launch(name, folder, run_home, a, extra, warmup=name != "unwarmed"))
        checkpoint = f"checkpoint {'reused' if reused else 'written'}"
        text = json.dumps({"shape": a.shape, "checkpoint_reused": reused, "prompt": PROMPT,
                           "runs": [{k: v for k, v in asdict(r).items() if k != "arrivals"} for r in runs]}, indent=2)
        if a.json_file:
            Path(a.json_file).write_text(text + "\n", encoding="utf-8")
        print(text if a.json else format_startup(a.shape, runs, checkpoint))
        return 0 if all(r.status == "ok" for r in runs) else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
