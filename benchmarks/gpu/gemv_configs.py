"""Manual GPU microbenchmark (not collected by pytest): every configuration of the bf16 GEMV kernel
(engine/gemv.py's _CONFIGS) on each product of Mistral-7B, whole and halved as each of 2 tensor-parallel ranks
holds it, timed as decode runs them: in a CUDA graph, with programmatic dependent launch where the GPU has it,
each call reading another copy of the weight (out of 400 MB of copies, so from memory, not L2) after a small
kernel wrote its activation. Next to them, what the autotuner picks in several rounds of tuning from scratch and
the times it measured (triton.testing.do_bench, one launch at a time): do its picks vary between processes, and
do they match the fastest configuration in the graph?

    python3 benchmarks/gpu/gemv_configs.py [ROUNDS]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
from int8_gemv import graph_time  # noqa: E402

from mistral_chat.bench.run import copy_bandwidth  # noqa: E402
from mistral_chat.engine.kernels import gemv  # noqa: E402

# name: (rows, columns, SwiGLU, normed): the products as decode runs them
SHAPES = {"wqkv": (6144, 4096, False, True), "wo": (4096, 4096, False, False), "w13": (28672, 4096, True, True),
          "w2": (4096, 14336, False, False), "wqkv/2": (3072, 4096, False, True), "wo/2": (4096, 2048, False, False),
          "w13/2": (14336, 4096, True, True), "w2/2": (4096, 7168, False, False)}


def name(config) -> str:
    """A triton.Config as rows x columns, warps, stages."""
    return f"{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; us per product in a CUDA "
          f"graph (% of the copy bandwidth); * the fastest; autotuning's picks in {rounds} rounds from scratch")
    table = {}
    for shape, (n, k, swiglu, normed) in SHAPES.items():
        copies = max(1, (400 << 20) // (2 * n * k))
        w = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        source = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        x, h = source.clone(), torch.randn(k, device=device, dtype=torch.bfloat16)

        def product(config, i):  # linear_row in `config` (None: autotuned), after a small kernel wrote x, as in decode
            gemv.measured_config = lambda *shape: config
            torch.mul(source, 1.0, out=x)
            return gemv.linear_row(x, w[i], swiglu=swiglu, norm_of=h if normed else None, eps=1e-5)

        want = product(None, 0)
        times = {}
        for config in gemv._CONFIGS:
            torch.testing.assert_close(product(config, 0), want, rtol=2e-2, atol=2e-2)
            times[name(config)] = graph_time(lambda i: product(config, i), copies)
        picks = []  # (the pick, its do_bench time and the runners-up, us)
        for _ in range(rounds):
            gemv._gemv_kernel.cache.clear()
            product(None, 0)
            tuned = {name(c): (t[0] if isinstance(t, list) else t) * 1e3
                     for c, t in gemv._gemv_kernel.configs_timings.items()}
            ranked = sorted(tuned, key=tuned.get)
            picks.append((name(gemv._gemv_kernel.best_config), ", ".join(f"{c} {tuned[c]:.1f}" for c in ranked[:3])))
        table[shape] = (times, picks)
        fastest = min(times, key=times.get)
        print(f"\n{shape} [{n} x {k}]" + (" SwiGLU" if swiglu else "") + (" normed" if normed else ""))
        for c, t in times.items():
            print(f"  {c:16} {t * 1e6:7.2f} us {2 * n * k / t / bandwidth:5.0%}" + (" *" if c == fastest else ""))
        for i, (pick, top) in enumerate(picks):
            print(f"  autotune round {i + 1}: {pick} (do_bench top 3: {top})  -> graph {times[pick] * 1e6:.2f} us")
    print("\nshape     fastest in graph          us   gemv._HOPPER_CONFIGS' us   picks' graph us")
    for shape, (times, picks) in table.items():
        fastest = min(times, key=times.get)
        n, k, swiglu, _ = SHAPES[shape]
        given = gemv._HOPPER_CONFIGS.get((n // (2 if swiglu else 1), k, 2 if swiglu else 1))
        print(f"{shape:9} {fastest:18} {times[fastest] * 1e6:8.2f}   "
              + (f"{name(given):16} {times[name(given)] * 1e6:6.2f}" if given else f"{'-':23}") + "   "
              + " ".join(f"{times[pick] * 1e6:.2f}" for pick, _ in picks))

if __name__ == "__main__":
    main()
