"""Manual GPU microbenchmark (not collected by pytest): batch-1 int8 products of Mistral-7B's shapes, inductor's
compiled dequantize-and-multiply (what `--quantize int8` runs with MISTRAL_CHAT_INT8_KERNEL=0) against the Triton kernel of
engine/int8_gemv.py (the default), and bf16's product for reference; each as the GB/s it reads
its weight at, next to the device's copy bandwidth. As in decode, the weights come from memory, not the 50 MB L2
cache: each timed call reads another copy, out of enough copies to fill 400 MB. It also checks the kernel against
the plain product, and prints the configuration its autotuner chose for each shape.

    python3 tests/gpu_int8_gemv.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mistral_chat.bench import copy_bandwidth  # noqa: E402
from mistral_chat.engine import int8_gemv  # noqa: E402
from mistral_chat.engine.quant import quantize_rows  # noqa: E402

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336),
          "output": (32000, 4096)}


def graph_time(fn, copies: int, reps: int = 50, replays: int = 5) -> float:
    """Seconds per call of fn(i) for copy i, captured `reps` times in one CUDA graph (no launch cost, as decode
    runs), cycling through the copies, the graph replayed `replays` times."""
    for i in range(3):
        fn(i % copies)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / (replays * reps)


def main() -> None:
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    torch._inductor.config.coordinate_descent_tuning = True  # as compiled decode sets it
    plain = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s)
    print(f"{'matrix':8} {'MB int8':>8} {'inductor':>16} {'kernel':>16} {'bf16':>16}")
    for name, (n, k) in SHAPES.items():
        copies = max(1, (400 << 20) // (2 * n * k))
        w = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        q, scale = zip(*(quantize_rows(one) for one in w))
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        want = F.linear(x.float(), q[0].float()) * scale[0].float()
        got = int8_gemv.int8_linear(x, q[0], scale[0]).float()
        error = ((got - want).abs().max() / want.abs().max()).item()
        assert error < 1e-2, f"{name}: the kernel is off by {error:.3g} of the largest output"
        cells = []
        for fn, nbytes in ((lambda i: plain(x, q[i], scale[i]), n * k),
                           (lambda i: int8_gemv.int8_linear(x, q[i], scale[i]), n * k),
                           (lambda i: F.linear(x, w[i]), 2 * n * k)):
            seconds = graph_time(fn, copies)
            cells.append(f"{seconds * 1e6:6.1f} us {nbytes / seconds / bandwidth:4.0%}")
        print(f"{name:8} {n * k / 1e6:8.1f} " + " ".join(f"{c:>16}" for c in cells))
    for key, config in int8_gemv._int8_gemv_kernel.cache.items():
        print("autotuned", key, config)

if __name__ == "__main__":
    main()
