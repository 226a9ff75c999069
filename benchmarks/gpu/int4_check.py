"""Manual GPU check of `--quantize int4` (not collected by pytest), on random weights of real shapes:

  error     one layer of Mistral-7B: each projection's output error (relative L2) with int4 and int8 weights
            against bf16, for Gaussian inputs and for inputs with outlier channels, side by side, and the
            1-layer model's logits;
  products  each of Mistral-7B's batch-1 products alone in CUDA graphs: bf16 (cuBLAS), the int8 kernel and the int4
            kernel, as us and as GB/s of the bytes each reads, next to the copy bandwidth; the int4 kernel checked
            against the dequantized product (GPU only);
  mixtral   full Mixtral-8x7B (32 layers) with int4 weights: memory after loading and after a 4k cache (target:
            <= 28 GB), the loader's estimate, and a greedy decode of 16 tokens (eager: the int4 kernel and the
            chosen experts dequantized);
  decode    Mistral-7B batch-1 decode, compiled into CUDA graphs as `mistral-chat bench` runs it, bf16 / int8 /
            int4 (each the same as `python3 -m mistral_chat.bench.run --shape mistral-7b --quantize int4 --batch 1
            --steps 64 --prefill ""`).

    python3 benchmarks/gpu/int4_check.py                       # all four, ~3 min on an H100
    python3 benchmarks/gpu/int4_check.py --parts error,mixtral
    python3 benchmarks/gpu/int4_check.py --device cpu --layers 1 --mixtral-shape tiny --modes int8,int4 --steps 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
from mistral_chat.bench.run import copy_bandwidth, format_table, run_bench  # noqa: E402
from mistral_chat.bench.shapes import SHAPES, bench_shape  # noqa: E402
from mistral_chat.engine import int4  # noqa: E402
from mistral_chat.engine.loader import random_model  # noqa: E402
from mistral_chat.engine.memory import estimate_memory  # noqa: E402
from mistral_chat.engine.plan import choose_plan  # noqa: E402
from mistral_chat.engine.quant import quantize_rows  # noqa: E402

GB = 1e9


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def part_error(dev: torch.device, shape: str) -> None:
    """Each projection of layer 0 and the 1-layer model's logits: int8 and int4 against bf16."""
    config = bench_shape(shape, 1)
    models = {mode: random_model(config, dev, torch.bfloat16, mode) for mode in (None, "int8", "int4")}
    gen = torch.Generator(device=dev).manual_seed(1)
    print(f"\n[error] {shape}, layer 0, relative L2 error of each product's output against bf16 (Gaussian weights, "
          "std 0.02)")
    print(f"{'product':10} {'input':10} {'int8':>8} {'int4':>8}  int4 format")
    for name in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
        mods = {mode: models[mode].layers[0].get_submodule(name) for mode in models}
        k = mods[None].in_features
        x = torch.randn(16, k, device=dev, generator=gen)
        outliers = x.clone()
        outliers[:, torch.randperm(k, device=dev, generator=gen)[: k // 100]] *= 20  # 1% of channels x20
        for label, inp in (("gaussian", x), ("outliers", outliers)):
            inp = inp.to(torch.bfloat16)
            want = mods[None](inp)
            print(f"{name.split('.')[-1]:10} {label:10} {rel(mods['int8'](inp), want):8.4f} "
                  f"{rel(mods['int4'](inp), want):8.4f}  {type(mods['int4']).__name__} "
                  f"{getattr(mods['int4'], 'group', '')}")
    tokens = torch.randint(0, config.vocab_size, (1, 64), device=dev, generator=gen)
    logits = {}
    for mode, model in models.items():
        model.setup_cache(128)
        with torch.no_grad():
            logits[mode] = model(tokens, 0, all_logits=True)
    agree = {m: (logits[m].argmax(-1) == logits[None].argmax(-1)).float().mean().item() for m in ("int8", "int4")}
    print(f"{'logits':10} {'64 tokens':10} {rel(logits['int8'], logits[None]):8.4f} "
          f"{rel(logits['int4'], logits[None]):8.4f}  greedy agreement int8 {agree['int8']:.2f}, "
          f"int4 {agree['int4']:.2f}")
    del models, logits


def graph_time(fn, copies: int, reps: int = 50, replays: int = 5) -> float:
    """Seconds a call of fn(i) for copy i, captured `reps` times in one CUDA graph (cycling through the copies),
    the graph replayed `replays` times."""
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


def part_products(dev: torch.device) -> None:
    """Mistral-7B's batch-1 products alone: bf16, int8 kernel, int4 kernel, each timed call reading another copy of
    its weight out of enough copies to fill 400 MB (as in decode, from memory, not the 50 MB L2)."""
    from mistral_chat.engine.kernels import int4_gemv, int8_gemv

    bandwidth = copy_bandwidth(dev) / GB
    print(f"\n[products] batch-1 products in CUDA graphs; copy bandwidth {bandwidth:.0f} GB/s")
    print(f"{'product':8} {'bf16 us':>8} {'GB/s':>6} {'int8 us':>8} {'GB/s':>6} {'int4 us':>8} {'GB/s':>6} "
          f"{'int4/int8':>9}  int4 kernel vs dequantized")
    for name, (n, k) in {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336),
                         "output": (32768, 4096)}.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        q8, s8 = quantize_rows(w)
        codes, scale, low = int4.quantize_groups(w, int4.group_size(k))
        packed = int4.pack(codes)
        del codes
        got = int4_gemv.int4_linear(x, packed, scale, low)
        want = F.linear(x.float(), int4.dequantize(packed, scale, low, torch.float32))
        b16, b8 = n * k * 2, n * k + n * 2
        b4 = packed.numel() + (scale.numel() + low.numel()) * 2

        def copies(nbytes: int, *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
            return [tuple(t.clone() for t in tensors) for _ in range(max(1, -(-400_000_000 // nbytes)))]

        w16, w8, w4 = copies(b16, w), copies(b8, q8, s8), copies(b4, packed, scale, low)
        t16 = graph_time(lambda i: F.linear(x, w16[i][0]), len(w16))
        t8 = graph_time(lambda i: int8_gemv.int8_linear(x, *w8[i]), len(w8))
        t4 = graph_time(lambda i: int4_gemv.int4_linear(x, *w4[i]), len(w4))
        del w16, w8, w4
        print(f"{name:8} {t16 * 1e6:8.1f} {b16 / t16 / GB:6.0f} {t8 * 1e6:8.1f} {b8 / t8 / GB:6.0f} {t4 * 1e6:8.1f} "
              f"{b4 / t4 / GB:6.0f} {t8 / t4:8.2f}x  rel {rel(got, want):.1e}")
        del w, q8, s8, packed, scale, low
    print("int4 kernel configs chosen:", {str(k): str(v) for k, v in int4_gemv._int4_gemv_kernel.cache.items()}
          if hasattr(int4_gemv._int4_gemv_kernel, "cache") else "n/a")


def part_mixtral(dev: torch.device, shape: str, layers: int | None, steps: int) -> None:
    """Full Mixtral with int4 weights: memory, the estimate, greedy decode."""
    if shape == "tiny":  # a CPU smoke test: the tiny shape with 4 experts
        config = SHAPES["tiny"].with_(num_experts=4, num_experts_per_tok=2, sliding_window=None)
    else:
        config = bench_shape(shape, layers)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    started = time.perf_counter()
    model = random_model(config, dev, torch.bfloat16, "int4")
    load_s = time.perf_counter() - started
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    estimate = estimate_memory(config, torch.bfloat16, 4096, quantize="int4")
    print(f"\n[mixtral] {shape}, {config.n_layers} layers, int4 ({load_s:.1f} s to build and quantize); plan: "
          f"{model.plan.describe()}")
    print(f"weights held {held / GB:.2f} GB; the loader's estimate: weights {estimate.weights / GB:.2f} GB + KV "
          f"cache {estimate.kv_cache / GB:.2f} GB = {estimate.total / GB:.2f} GB")
    if cuda:
        print(f"after loading: allocated {(torch.cuda.memory_allocated(dev) - base) / GB:.2f} GB, peak while "
              f"loading {(torch.cuda.max_memory_allocated(dev) - base) / GB:.2f} GB")
    model.setup_cache(4096)
    if cuda:
        print(f"with a 4k cache: allocated {(torch.cuda.memory_allocated(dev) - base) / GB:.2f} GB, reserved "
              f"{torch.cuda.memory_reserved(dev) / GB:.2f} GB (target <= 28 GB)")
    gen = torch.Generator(device=dev).manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (1, 16), device=dev, generator=gen)
    out = []
    with torch.no_grad():
        logits = model(ids, 0)[:, -1]
        assert torch.isfinite(logits).all(), "prefill logits not finite"
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for pos in range(16, 16 + steps):
            token = logits.argmax(-1)
            out.append(int(token))
            logits = model(token.view(1, 1), pos)[:, -1]
            assert torch.isfinite(logits).all(), f"decode logits not finite at {pos}"
        if cuda:
            torch.cuda.synchronize()
    per_token = (time.perf_counter() - started) / steps
    print(f"greedy decode (eager) of {steps} tokens: {per_token * 1000:.1f} ms/token; tokens {out}")
    if cuda:
        print(f"peak allocated over the whole part: {(torch.cuda.max_memory_allocated(dev) - base) / GB:.2f} GB")
    del model


def part_decode(dev: torch.device, shape: str, layers: int | None, modes: list[str], steps: int) -> None:
    """What `mistral-chat bench` times for batch-1 decode, one mode after another in this process."""
    cuda = dev.type == "cuda"
    for mode in modes:
        quantize = None if mode == "bf16" else mode
        result = run_bench(shape, str(dev), "bfloat16", layers, prompt=512 if cuda else 16, steps=steps,
                           batches=[1], compile=cuda, quantize=quantize, prefill_lengths=[])
        print(f"\n[decode] {mode}")
        print(format_table(result))
        torch.cuda.empty_cache() if cuda else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", default="error,products,mixtral,decode")
    parser.add_argument("--shape", default="mistral-7b", help="the dense shape (error, decode)")
    parser.add_argument("--layers", type=int, default=None, help="layers of the dense shape in decode (all)")
    parser.add_argument("--mixtral-shape", default="mixtral-8x7b", help="mixtral-8x7b, or tiny (CPU smoke test)")
    parser.add_argument("--mixtral-layers", type=int, default=None, help="Mixtral's layers (all 32)")
    parser.add_argument("--modes", default="bf16,int8,int4", help="decode: which weights")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    args = parser.parse_args()
    dev = torch.device(args.device)
    parts = args.parts.split(",")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; plan "
          f"for int4 here: {choose_plan(dev, torch.bfloat16, 1, 'int4', dev.type == 'cuda').describe()}")
    started = time.perf_counter()
    if "error" in parts:
        part_error(dev, args.shape)
    if "products" in parts:
        if dev.type == "cuda":
            part_products(dev)
        else:
            print("\n[products] skipped: GPU only")
    if "mixtral" in parts:
        part_mixtral(dev, args.mixtral_shape, args.mixtral_layers, 16 if dev.type == "cuda" else 4)
    if "decode" in parts:
        part_decode(dev, args.shape, args.layers, args.modes.split(","), args.steps)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
