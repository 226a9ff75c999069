"""Manual GPU microbenchmark (not collected by pytest): every configuration of the bf16 GEMV kernel
(engine/gemv.py's _CONFIGS) on each product of Mistral-7B, whole and halved as each of 2 tensor-parallel ranks
holds it, timed as decode runs them: in a CUDA graph, with programmatic dependent launch where the GPU has it,
each call reading another copy of the weight (out of 400 MB of copies, so from memory, not L2) after a small
kernel wrote its activation. Next to them, what the autotuner picks in several rounds of tuning from scratch and
the times it measured (triton.testing.do_bench, one launch at a time): do its picks vary between processes, and
do they match the fastest configuration in the graph?

    python3 tests/gpu_gemv_configs.py [ROUNDS]
"""

from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpu_int8_gemv import graph_time  # noqa: E402

from mistral_chat.bench import copy_bandwidth  # noqa: E402
from mistral_chat.engine import gemv  # noqa: E402
from mistral_chat.engine.fused import pdl  # noqa: E402

# name: (rows, columns, SwiGLU, normed): the products as decode runs them
SHAPES = {"wqkv": (6144, 4096, False, True), "wo": (4096, 4096, False, False), "w13": (28672, 4096, True, True),
          "w2": (4096, 14336, False, False), "wqkv/2": (3072, 4096, False, True), "wo/2": (4096, 2048, False, False),
          "w13/2": (14336, 4096, True, True), "w2/2": (4096, 7168, False, False)}


def name(config: "triton.Config") -> str:
    return f"{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    os.environ["MISTRAL_CHAT_GEMV_MEASURED"] = "0"  # linear_row autotunes (gemv._HOPPER_CONFIGS come from here)
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; us per product in a CUDA "
          f"graph (% of the copy bandwidth); * the fastest; autotuning's picks in {rounds} rounds from scratch")
    configs = gemv._CONFIGS
    table = {}
    for shape, (n, k, swiglu, normed) in SHAPES.items():
        parts = 2 if swiglu else 1
        copies = max(1, (400 << 20) // (2 * n * k))
        w = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        source = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        x, h = source.clone(), torch.randn(k, device=device, dtype=torch.bfloat16)
        out = torch.empty(n // parts, device=device, dtype=torch.bfloat16)
        want = gemv.linear_row(x, w[0], swiglu=swiglu, norm_of=h if normed else None, eps=1e-5)

        def launch(config, i):
            torch.mul(source, 1.0, out=x)  # the activation written just before, as in decode
            gemv._gemv_kernel.fn[(triton.cdiv(n // parts, config.kwargs["BLOCK_N"]),)](
                x, w[i], out, n // parts, k, k, n // parts, h, 1e-5, out, out, 0, PARTS=parts, NORM=normed,
                SEND=False, RANK=0, WORLD=1, SEND_BLOCK=1, NORM_BLOCK=gemv._norm_block(k) if normed else 0,
                **config.all_kwargs(), **pdl(x))

        times = {}
        for config in configs:
            launch(config, 0)
            torch.testing.assert_close(out, want.reshape(-1), rtol=2e-2, atol=2e-2)
            times[name(config)] = graph_time(lambda i: launch(config, i), copies)
        picks = []
        for _ in range(rounds):
            gemv._gemv_kernel.cache.clear()
            gemv.linear_row(x, w[0], swiglu=swiglu, norm_of=h if normed else None, eps=1e-5)
            best = gemv._gemv_kernel.best_config
            tuned = {name(c): t for c, t in gemv._gemv_kernel.configs_timings.items()}
            ranked = sorted(tuned, key=lambda c: tuned[c][0] if isinstance(tuned[c], list) else tuned[c])
            picks.append(f"{name(best)} (do_bench top 3: " + ", ".join(
                f"{c} {(tuned[c][0] if isinstance(tuned[c], list) else tuned[c]) * 1e3:.1f}" for c in ranked[:3]) + ")")
        table[shape] = (times, 2 * n * k, picks)
        fastest = min(times, key=times.get)
        print(f"\n{shape} [{n} x {k}]" + (" SwiGLU" if swiglu else "") + (" normed" if normed else ""))
        for c, t in times.items():
            print(f"  {c:16} {t * 1e6:7.2f} us {2 * n * k / t / bandwidth:5.0%}" + (" *" if c == fastest else ""))
        for i, p in enumerate(picks):
            print(f"  autotune round {i + 1}: {p}  -> graph {times[p.split(' (')[0]] * 1e6:.2f} us")
    print("\nshape     fastest in graph          us   gemv._HOPPER_CONFIGS' us   picks' graph us")
    for shape, (times, nbytes, picks) in table.items():
        fastest = min(times, key=times.get)
        n, k, swiglu, _ = SHAPES[shape]
        given = gemv._HOPPER_CONFIGS.get((n // (2 if swiglu else 1), k, 2 if swiglu else 1))
        print(f"{shape:9} {fastest:18} {times[fastest] * 1e6:8.2f}   "
              + (f"{name(given):16} {times[name(given)] * 1e6:6.2f}" if given else f"{'-':23}") + "   "
              + " ".join(f"{times[p.split(' (')[0]] * 1e6:.2f}" for p in picks))


if __name__ == "__main__":
    main()
