"""Does the chat TUI keep up with the engine? The same 1500-token greedy answer of one tiny random checkpoint,
made by `mistral-chat --prompt` (one-shot) and by the TUI in a real terminal (tmux), tokens/s compared.

    python benchmarks/tui_throughput.py [--tokens 1500] [--repeat 3] [--shape tiny] [--keep DIR]

The checkpoint is bench/checkpoint.py's random one (float32, on the CPU): the output rows of its special ids are
zero, so greedy decoding never meets EOS and every run makes exactly --tokens tokens. One-shot's figure is the
tokens/s that `-v` prints; the TUI's is the same engine statistic as the status bar shows it once the answer is
done (what the user reads), taken from the tmux screen. Each run is a fresh process with a fresh MISTRAL_CHAT_HOME;
the runs alternate (one-shot, TUI, one-shot, ...) so that a neighbour's load on a shared machine hits both alike.
Both run with OMP_NUM_THREADS=1: on a small shared machine, torch's OpenMP threads spin against a neighbour's
load and a tiny model's decode drops from ~900 to ~50 tokens/s at random, which hides what is measured here.
Prints each run, then the medians and their ratio (the issue's target: the TUI >= 90% of one-shot), and the median
of each pair's ratio, which a neighbour's load drifting over minutes moves less.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

PROMPT = "Tell me a long story about the sea."
ONE_SHOT = re.compile(r"generated (\d+), first token \d+ ms, ([\d.]+) tokens/s")
STATUS = re.compile(r"(\d+) tok\b.*?([\d.]+) tok/s")


def write_checkpoint(folder: Path, shape: str) -> Path:
    import torch

    from mistral_chat.bench.checkpoint import reusable, write_random_checkpoint
    from mistral_chat.bench.shapes import bench_shape

    config = bench_shape(shape)
    if not reusable(folder, config):
        write_random_checkpoint(folder, config, torch.float32)
    return folder


def model_args(model: Path, tokens: int) -> list[str]:
    return ["--model", str(model), "--device", "cpu", "--dtype", "float32", "--max-tokens", str(tokens),
            "--temperature", "0", "--context", str(max(4096, tokens + 256))]


def one_shot(model: Path, tokens: int, home: Path) -> tuple[int, float]:
    env = dict(os.environ, MISTRAL_CHAT_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "mistral_chat.cli.main", *model_args(model, tokens), "--prompt",
                           PROMPT, "-v"], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          timeout=600)
    found = ONE_SHOT.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"one-shot failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(found.group(1)), float(found.group(2))


def _plain_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class Tmux:
    def __init__(self) -> None:
        self.socket = f"mc-bench-{uuid.uuid4().hex[:8]}"
        self.session = "bench"

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], check=True, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=_plain_signals).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session)

    def wait(self, condition, timeout: float, what: str) -> str:  # noqa: ANN001 - a predicate on the screen
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if condition(text):
                return text
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}; the screen was:\n{text}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def tui(model: Path, tokens: int, home: Path, size: tuple[int, int] = (120, 40)) -> tuple[int, float]:
    """The TUI in tmux: load, send the prompt, wait for the answer's final figures in the status bar."""
    env = {"MISTRAL_CHAT_HOME": str(home), "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color", "OMP_NUM_THREADS": "1",
           "PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    command = shlex.join([sys.executable, "-m", "mistral_chat.cli.main", *model_args(model, tokens)])
    tmux = Tmux()
    try:
        tmux.run("new-session", "-d", "-s", tmux.session, "-x", str(size[0]), "-y", str(size[1]),
                 f"env -i {exports} {command}; sleep 30")
        tmux.wait(lambda s: "cpu float32" in s, 120, "the model to load")
        tmux.run("send-keys", "-t", tmux.session, "-l", PROMPT + "\r")

        def status_line(screen: str) -> str:
            return next((line for line in screen.splitlines() if "tok/s" in line and "│" in line), "")

        def finished(screen: str) -> bool:
            line = status_line(screen)
            return "generating" not in line and f" {tokens} tok " in line

        screen = tmux.wait(finished, 300, "the answer")
        found = STATUS.search(status_line(screen))
        assert found is not None
        tmux.run("send-keys", "-t", tmux.session, "C-q")
        return int(found.group(1)), float(found.group(2))
    finally:
        tmux.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--keep", help="keep (and reuse) the checkpoint in this folder")
    args = parser.parse_args(argv)
    if shutil.which("tmux") is None:
        print("tmux is not installed (apt-get install tmux)", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="tui-throughput-"))
    try:
        model = write_checkpoint(Path(args.keep) if args.keep else scratch / "model", args.shape)
        shot_rates: list[float] = []
        tui_rates: list[float] = []
        for i in range(args.repeat):
            made, rate = one_shot(model, args.tokens, scratch / f"home-shot-{i}")
            shot_rates.append(rate)
            print(f"one-shot  run {i + 1}: {made} tokens, {rate:7.1f} tok/s", flush=True)
            made, rate = tui(model, args.tokens, scratch / f"home-tui-{i}")
            tui_rates.append(rate)
            print(f"TUI       run {i + 1}: {made} tokens, {rate:7.1f} tok/s", flush=True)
        shot, shown = statistics.median(shot_rates), statistics.median(tui_rates)
        spread = lambda xs: f"{min(xs):.0f}-{max(xs):.0f}"  # noqa: E731
        print(f"median one-shot {shot:.1f} tok/s ({spread(shot_rates)}), TUI {shown:.1f} tok/s "
              f"({spread(tui_rates)}): TUI/one-shot = {shown / shot:.0%}")
        pairs = sorted(t / o for t, o in zip(tui_rates, shot_rates))
        print(f"each TUI run over the one-shot run before it: median {statistics.median(pairs):.0%} "
              f"({' '.join(f'{x:.0%}' for x in pairs)})")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
