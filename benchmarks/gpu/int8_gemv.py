"""Manual GPU microbenchmark (not collected by pytest): batch-1 products of Mistral-7B's matrices, whole and
halved as each of 2 tensor-parallel ranks holds them, each as the GB/s it reads its weight at next to the
device's copy bandwidth. int8: inductor's compiled dequantize-and-multiply (the plan's int8=torch) and the
Triton kernel of engine/int8_gemv.py, with its portable bit operations and with its GPU path (one PRMT per
weight, x read as 64-bit words: the default); bf16: cuBLAS (F.linear) and the kernel of engine/gemv.py. As in
decode, a small kernel writes the activation before each product, and the weights come from memory, not the
50 MB L2 cache: each timed call reads another copy, out of enough copies to fill 400 MB. It checks the kernels
against the plain products (the int8 kernel's two paths against each other: equal to a bf16 rounding) and
prints the configurations the autotuners chose.

    python3 benchmarks/gpu/int8_gemv.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
from mistral_chat.bench.run import copy_bandwidth  # noqa: E402
from mistral_chat.engine.kernels import gemv, int8_gemv  # noqa: E402
from mistral_chat.engine.quant import quantize_rows  # noqa: E402

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336),
          "output": (32000, 4096), "wqkv/2": (3072, 4096), "wo/2": (4096, 2048), "w13/2": (14336, 4096),
          "w2/2": (4096, 7168), "output/2": (16000, 4096)}


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


def byte_permute(on: bool):
    """fn(i) -> fn(i) with int8_gemv.BYTE_PERMUTE set for its call (read at each launch, so at capture)."""
    def wrap(fn):
        def call(i):
            int8_gemv.BYTE_PERMUTE = on
            return fn(i)
        return call
    return wrap


def main() -> None:
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    torch._inductor.config.coordinate_descent_tuning = True  # as compiled decode sets it
    plain = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s)
    columns = ["int8 inductor", "int8 bit ops", "int8 PRMT", "bf16 cuBLAS", "bf16 kernel"]
    print(f"{'matrix':9} {'MB int8':>8} " + " ".join(f"{c:>17}" for c in columns))
    for name, (n, k) in SHAPES.items():
        copies = max(1, (400 << 20) // (2 * n * k))
        w = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        q, scale = zip(*(quantize_rows(one) for one in w))
        source = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        x = torch.empty_like(source)
        torch.mul(source, 1.0, out=x)
        want = F.linear(x.float(), q[0].float()) * scale[0].float()
        got = {on: byte_permute(on)(lambda i: int8_gemv.int8_linear(x, q[0], scale[0]).float())(0)
               for on in (False, True)}
        error = ((got[True] - want).abs().max() / want.abs().max()).item()
        assert error < 1e-2, f"{name}: the int8 kernel is off by {error:.3g} of the largest output"
        # the two paths sum in another order across threads: their bf16 outputs may differ by one rounding step
        torch.testing.assert_close(got[True], got[False], rtol=8e-3, atol=1e-3 * want.abs().max().item())
        want = F.linear(x.float(), w[0].float())
        error = ((gemv.linear_row(x, w[0]).float() - want).abs().max() / want.abs().max()).item()
        assert error < 1e-2, f"{name}: the bf16 kernel is off by {error:.3g} of the largest output"

        def produced(fn):  # the activation written by a small kernel just before the product, as in decode
            return lambda i: (torch.mul(source, 1.0, out=x), fn(i))[1]

        runs = [(lambda i: plain(x, q[i], scale[i]), n * k),
                (byte_permute(False)(lambda i: int8_gemv.int8_linear(x, q[i], scale[i])), n * k),
                (byte_permute(True)(lambda i: int8_gemv.int8_linear(x, q[i], scale[i])), n * k),
                (lambda i: F.linear(x, w[i]), 2 * n * k),
                (lambda i: gemv.linear_row(x, w[i]), 2 * n * k)]
        cells = []
        for fn, nbytes in runs:
            seconds = graph_time(produced(fn), copies)
            cells.append(f"{seconds * 1e6:6.1f} us {nbytes / seconds / bandwidth:4.0%}")
        print(f"{name:9} {n * k / 1e6:8.1f} " + " ".join(f"{c:>17}" for c in cells), flush=True)
    int8_gemv.BYTE_PERMUTE = True
    for kernel in (int8_gemv._int8_gemv_kernel, gemv._gemv_kernel):
        for key, config in kernel.cache.items():
            print("autotuned", getattr(kernel.fn, "__name__", "kernel"), key, config)


if __name__ == "__main__":
    main()
