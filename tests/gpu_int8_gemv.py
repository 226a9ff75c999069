"""Manual GPU microbenchmark (not collected by pytest): batch-1 int8 products of Mistral-7B's shapes, inductor's
compiled dequantize-and-multiply (what `--quantize int8` runs by default) against the Triton kernel of
engine/int8_gemv.py (MISTRAL_CHAT_INT8_KERNEL=1), and bf16's product for reference; each as the GB/s it reads
its weight at, next to the device's copy bandwidth. It also checks the kernel against the plain product.

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


def graph_time(fn, reps: int = 50) -> float:
    """Seconds per call of fn, replayed `reps` times from one CUDA graph (no launch cost, as decode runs)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / (5 * reps)


def main() -> None:
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    torch._inductor.config.coordinate_descent_tuning = True  # as compiled decode sets it
    plain = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s)
    print(f"{'matrix':8} {'MB int8':>8} {'inductor':>16} {'kernel':>16} {'bf16':>16}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        q, scale = quantize_rows(w)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        want = F.linear(x.float(), q.float()) * scale.float()
        got = int8_gemv.int8_linear(x, q, scale).float()
        error = ((got - want).abs().max() / want.abs().max()).item()
        assert error < 1e-2, f"{name}: the kernel is off by {error:.3g} of the largest output"
        cells = []
        for fn, nbytes in ((lambda: plain(x, q, scale), q.numel()), (lambda: int8_gemv.int8_linear(x, q, scale),
                           q.numel()), (lambda: F.linear(x, w), 2 * w.numel())):
            seconds = graph_time(fn)
            cells.append(f"{seconds * 1e6:6.1f} us {nbytes / seconds / bandwidth:4.0%}")
        print(f"{name:8} {q.numel() / 1e6:8.1f} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
