"""How fast the weights of a model folder reach the GPU from the page cache, by each way there is: the engine's
load_model, safetensors' own safe_open(device="cuda"), and plain reads of the files into pinned memory by N threads
followed by one copy to the GPU (the ceiling a loader can aim at).

    python3 benchmarks/gpu/load_speed.py FOLDER [--threads 1,4,8,16]

Run it twice in a row (or after `cat FOLDER/*.safetensors > /dev/null`) so that the files sit in the page cache.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def timed(label: str, nbytes: int, fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(f"{label:<44} {seconds:7.2f} s  {nbytes / seconds / 1e9:6.2f} GB/s", flush=True)
    return seconds


def safetensors_to_cuda(files: list[Path]) -> None:
    kept = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cuda") as f:
            for name in f.keys():
                kept.append(f.get_tensor(name))
    del kept


def pinned_reads(files: list[Path], threads: int, chunk: int = 64 << 20) -> None:
    """Each file read by `threads` readers in `chunk`-byte pieces into one pinned buffer, then copied to the GPU."""
    for path in files:
        size = path.stat().st_size
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        view = memoryview(host.numpy())
        fd = os.open(path, os.O_RDONLY)
        try:
            def read(offset: int) -> None:
                end = min(offset + chunk, size)
                done = offset
                while done < end:
                    done += os.preadv(fd, [view[done:end]], done)

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(read, range(0, size, chunk)))
        finally:
            os.close(fd)
        host.to("cuda", non_blocking=True)
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("--threads", default="1,4,8,16")
    a = p.parse_args()
    files = files_of(a.folder)
    nbytes = sum(f.stat().st_size for f in files)
    print(f"{a.folder}: {len(files)} files, {nbytes / 1e9:.2f} GB", flush=True)
    for f in files:  # into the page cache
        with open(f, "rb") as fh:
            while fh.read(256 << 20):
                pass
    from mistral_chat.engine.loader import load_model

    def engine() -> None:
        loaded = load_model(a.folder, device="cuda")
        del loaded

    timed("engine load_model (config, tokenizer, weights)", nbytes, engine)
    torch.cuda.empty_cache()
    from mistral_chat.engine import weights

    fast = weights.GpuReader
    weights.GpuReader = lambda device: None  # the CPU path: safetensors' memory map, then .to(device)
    timed("engine load_model through the CPU (before)", nbytes, engine)
    weights.GpuReader = fast
    torch.cuda.empty_cache()
    timed("safetensors safe_open(device='cuda')", nbytes, lambda: safetensors_to_cuda(files))
    torch.cuda.empty_cache()
    for threads in (int(t) for t in a.threads.split(",")):
        timed(f"pread x{threads} into pinned memory, then to GPU", nbytes, lambda: pinned_reads(files, threads))
    torch.cuda.empty_cache()
    # the first load of a process also pays lazy imports and the first GPU and pinned allocations (2026-12-06: 6.95 s
    # first, against 4.43 for the CPU path second): the engine's path again, last
    timed("engine load_model again, after the others", nbytes, engine)
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    timed("1 GiB pinned host -> GPU copy alone", 1 << 30, lambda: host.to("cuda", non_blocking=True))


if __name__ == "__main__":
    main()
