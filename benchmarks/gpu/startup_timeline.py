"""Where the seconds between launch and the first answer go: runs `mistral-chat` in this process while a sampler
thread records every thread's Python stack every few milliseconds, then prints a timeline (what each thread was
doing, in segments) and the mistral_chat functions by inclusive time. A poor man's py-spy (none on the GPU machine).

    python3 benchmarks/gpu/startup_timeline.py [--every-ms 5] [--no-warmup] -- --model DIR --prompt "..." -v

The engine's kernel warm-up shows as its own threads (kernel-warmup: the throwaway model's steps; kernel-compile_N:
Triton's compiles, ptxas in `subprocess`); `--no-warmup` leaves it out (mistral_chat/bench/unwarmed.py), so that
with an empty TRITON_CACHE_DIR the compiles show inside the answer's first prefill and decode instead.

Set PYTHONPYCACHEPREFIX to a folder kept between runs when the installed packages have no .pyc files (an install
by pip writes them; a read-only site-packages without them byte-compiles its modules in every process).
"""

from __future__ import annotations

import time

LAUNCHED = time.perf_counter()

import argparse  # noqa: E402
import collections  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402


class Sampler(threading.Thread):
    def __init__(self, every: float) -> None:
        super().__init__(daemon=True, name="sampler")
        self.every = every
        self.samples: list[tuple[float, str, tuple[str, ...]]] = []
        self.rounds = 0
        self.running = True

    def run(self) -> None:
        me = threading.get_ident()
        while self.running:
            now = time.perf_counter() - LAUNCHED
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = []
                while frame is not None:
                    code = frame.f_code
                    stack.append(f"{code.co_filename}:{code.co_name}:{frame.f_lineno}")
                    frame = frame.f_back
                self.samples.append((now, names.get(ident, str(ident)), tuple(reversed(stack))))
            self.rounds += 1
            time.sleep(self.every)


def short(entry: str) -> str:
    path, func, line = entry.rsplit(":", 2)
    for marker in ("site-packages/", "mistral_chat/", "lib/python3"):
        if marker in path:
            path = (marker if marker == "mistral_chat/" else "") + path.split(marker, 1)[1]
            break
    return f"{path}:{func}:{line}"


def label(stack: tuple[str, ...]) -> str:
    """The innermost mistral_chat frame, and the import or leaf below it."""
    ours = [i for i, e in enumerate(stack) if "/mistral_chat/" in e and "<module>" not in e]
    below = stack[ours[-1] + 1:] if ours else stack
    modules = [e for e in below if ":<module>:" in e and "/mistral_chat/" not in e and "frozen" not in e
               and "runpy" not in e and "startup_timeline" not in e]
    where = short(stack[ours[-1]]) if ours else "-"
    if modules:
        return f"{where} > import {short(modules[0]).rsplit(':', 2)[0]}"
    leaf = next((e for e in reversed(stack) if "threading.py" not in e and "frozen" not in e), stack[-1])
    return f"{where} > {short(leaf)}"


def report(samples: list[tuple[float, str, tuple[str, ...]]], every: float, first_write: float | None) -> None:
    """`every`: seconds a sample stands for (the run's length over the sampler's rounds)."""
    out = sys.__stderr__
    print(f"\n== timeline (first stdout write at {first_write if first_write is not None else -1:.2f} s)", file=out)
    by_thread: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for t, name, stack in samples:
        # idle: waiting on a lock or condition, or a pool's worker (reader, compiler) waiting for work
        if stack and not stack[-1].rsplit(":", 1)[0].endswith((":wait", ":_wait_for_tstate_lock", "thread.py:_worker")):
            by_thread[name].append((t, label(stack)))
    for name, rows in by_thread.items():
        print(f"-- thread {name}", file=out)
        bucket = 0.05
        buckets: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        for t, lab in rows:
            buckets[int(t / bucket)][lab] += 1
        segments: list[list] = []
        for b in sorted(buckets):
            lab = buckets[b].most_common(1)[0][0]
            if segments and segments[-1][2] == lab and b - segments[-1][1] <= 2:
                segments[-1][1] = b
            else:
                segments.append([b, b, lab])
        for start, end, lab in segments:
            if (end - start + 1) * bucket >= 0.1:
                print(f"{start * bucket:6.2f}-{(end + 1) * bucket:6.2f} s  {lab}", file=out)
    inclusive: collections.Counter = collections.Counter()
    for t, name, stack in samples:
        for entry in {short(e).rsplit(":", 1)[0] for e in stack if "/mistral_chat/" in e or ":<module>:" in e}:
            inclusive[f"{name}: {entry}"] += 1
    print("-- inclusive seconds (thread: function)", file=out)
    for key, n in inclusive.most_common(40):
        print(f"{n * every:7.2f}  {key}", file=out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--every-ms", type=float, default=5.0)
    p.add_argument("--no-warmup", action="store_true", help="leave the engine's kernel warm-up out")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.no_warmup:
        from mistral_chat.bench.unwarmed import leave_out_warmup

        leave_out_warmup()
    sampler = Sampler(a.every_ms / 1000)
    first_write: list[float] = []
    real = sys.stdout

    class Watch:
        def write(self, text: str) -> int:
            if text and not first_write:
                first_write.append(time.perf_counter() - LAUNCHED)
            return real.write(text)

        def __getattr__(self, name: str):
            return getattr(real, name)

    sys.stdout = Watch()
    sampler.start()
    sys.argv = ["mistral-chat", *args]
    try:
        runpy.run_module("mistral_chat.cli.main", run_name="__main__")
    except SystemExit:
        pass
    finally:
        sampler.running = False
        sampler.join()
        every = (time.perf_counter() - LAUNCHED) / max(1, sampler.rounds)
        sys.stdout = real
        real.flush()
        print(f"\nexit at {time.perf_counter() - LAUNCHED:.2f} s", file=sys.__stderr__)
        report(sampler.samples, every, first_write[0] if first_write else None)


if __name__ == "__main__":
    main()
