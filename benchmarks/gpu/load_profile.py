"""Where the time of loading a model folder onto a GPU goes: import, CUDA start, the engine's GpuReader alone over
every tensor (pinned or not), then load_model twice in one process under cProfile (the functions that took the
most time, by their own time).

    python3 benchmarks/gpu/load_profile.py FOLDER [--top 15]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

started = time.perf_counter()
import torch  # noqa: E402

imported = time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    t0 = time.perf_counter()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    print(f"import torch {imported:.2f} s; CUDA start {time.perf_counter() - t0:.2f} s", flush=True)
    from mistral_chat.engine.gpu_reads import GpuReader, read_header, read_tensor

    files = sorted(a.folder.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    for piece_mb, threads in ((128, 8), (128, 16), (512, 16), (32, 16)):
        reader = GpuReader(torch.device("cuda"), piece=piece_mb << 20, threads=threads)
        t0 = time.perf_counter()
        kept = []
        for path in files:
            for entry in read_header(path).values():
                kept.append(read_tensor(reader, path, entry))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        pinned = all(b.is_pinned() for b in reader._buffers)
        reader.close()
        del kept
        torch.cuda.empty_cache()
        print(f"GpuReader {piece_mb} MB pieces x{threads} alone: {seconds:.2f} s, {total / seconds / 1e9:.2f} GB/s "
              f"(buffers pinned: {pinned})", flush=True)
    from mistral_chat.bench.unwarmed import leave_out_warmup
    from mistral_chat.engine.loader import load_model

    leave_out_warmup()  # the loader's reads alone, as before engine/warmup.py (bench --startup times it)

    for run in (1, 2):
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        loaded = load_model(a.folder, device="cuda")
        torch.cuda.synchronize()
        profile.disable()
        seconds = time.perf_counter() - t0
        print(f"load_model run {run}: {seconds:.2f} s, {total / seconds / 1e9:.2f} GB/s", flush=True)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(a.top)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-3000:], flush=True)
        del loaded
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
