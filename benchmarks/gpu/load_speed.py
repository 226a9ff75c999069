"""How fast the weights of a model folder reach the GPU from the page cache, by each way there is: the engine's
load_model, safetensors' own safe_open(device="cuda"), and plain reads of the files into pinned memory by N threads
followed by one copy to the GPU (the ceiling a loader can aim at).
Also a candidate loader (`ring_reads`: per-tensor GPU memory, then each file streamed in 64 MB pieces by N readers
through a ring of 8 pinned buffers, no barrier per tensor), checked byte for byte against safetensors first.

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


def ring_reads(files: list[Path], threads: int = 16, chunk: int = 64 << 20, ring: int = 8) -> list[torch.Tensor]:
    """A candidate loader: each file's tensors get their GPU memory first; then the file's data is read in `chunk`
    pieces by `threads` readers, up to `ring` pieces in flight in a ring of pinned buffers, and each piece, once
    read, is copied (asynchronously) into the parts of the tensors it overlaps. No barrier per tensor."""
    from mistral_chat.engine.gpu_reads import read_header

    buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(ring)]
    copied: list[torch.cuda.Event | None] = [None] * ring
    kept = []
    with ThreadPoolExecutor(threads) as pool:
        for path in files:
            entries = sorted(read_header(path).values(), key=lambda e: e.begin)
            outs = [torch.empty(e.end - e.begin, dtype=torch.uint8, device="cuda") for e in entries]
            kept += outs
            start, end = entries[0].begin, entries[-1].end
            fd = os.open(path, os.O_RDONLY)
            try:
                def read(slot: int, offset: int) -> int:
                    view = memoryview(buffers[slot].numpy())
                    n = min(chunk, end - offset)
                    done = 0
                    while done < n:
                        done += os.preadv(fd, [view[done:n]], offset + done)
                    return n

                offsets = list(range(start, end, chunk))
                futures = {}
                first = 0  # the tensor the next piece starts in
                for i, offset in enumerate(offsets):
                    for j in range(i, min(i + ring, len(offsets))):  # keep `ring` pieces in flight
                        if j not in futures:
                            slot = j % ring
                            if copied[slot] is not None:
                                copied[slot].synchronize()
                                copied[slot] = None
                            futures[j] = pool.submit(read, slot, offsets[j])
                    n = futures.pop(i).result()
                    slot = i % ring
                    piece_end = offset + n
                    while first < len(entries) and entries[first].end <= offset:
                        first += 1
                    k = first
                    while k < len(entries) and entries[k].begin < piece_end:
                        lo, hi = max(entries[k].begin, offset), min(entries[k].end, piece_end)
                        outs[k][lo - entries[k].begin:hi - entries[k].begin].copy_(
                            buffers[slot][lo - offset:hi - offset], non_blocking=True)
                        k += 1
                    event = torch.cuda.Event()
                    event.record()
                    copied[slot] = event
            finally:
                os.close(fd)
    torch.cuda.synchronize()
    return kept


def check_ring_reads(files: list[Path]) -> bool:
    """The candidate's bytes equal safetensors' for every tensor of the first file."""
    from safetensors import safe_open

    from mistral_chat.engine.gpu_reads import read_header

    got = ring_reads(files[:1])
    entries = sorted(read_header(files[0]).items(), key=lambda item: item[1].begin)
    with safe_open(str(files[0]), framework="pt", device="cpu") as f:
        for (name, entry), out in zip(entries, got):
            if not torch.equal(out.cpu().view(entry.dtype).view(entry.shape), f.get_tensor(name)):
                return False
    return True


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
    from mistral_chat.bench.unwarmed import leave_out_warmup
    from mistral_chat.engine.loader import load_model

    leave_out_warmup()  # the loader's reads alone, as before engine/warmup.py (bench --startup times it)

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
    print(f"candidate ring reads equal safetensors' bytes (first file): {check_ring_reads(files)}", flush=True)
    torch.cuda.empty_cache()
    for threads in (8, 16):
        timed(f"candidate: ring of 8 x 64 MB pinned, {threads} readers", nbytes,
              lambda: ring_reads(files, threads=threads))
        torch.cuda.empty_cache()
    # the first load of a process also pays lazy imports and the first GPU and pinned allocations (2026-12-06: 6.95 s
    # first, against 4.43 for the CPU path second): the engine's path again, last
    timed("engine load_model again, after the others", nbytes, engine)
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    timed("1 GiB pinned host -> GPU copy alone", 1 << 30, lambda: host.to("cuda", non_blocking=True))


if __name__ == "__main__":
    main()
