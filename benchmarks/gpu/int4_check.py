"""Manual GPU check of `--quantize int4` (not collected by pytest), on random weights of real shapes:

  error     one layer of Mistral-7B: each projection's output error (relative L2) with int4 and int8 weights
            against bf16, for Gaussian inputs and for inputs with outlier channels, side by side, and the
            1-layer model's logits;
  products  each of Mistral-7B's batch-1 products alone in CUDA graphs, as decode runs them (w13 with SwiGLU's
            last step in the int8 and int4 kernels): bf16 (cuBLAS), the int8 kernel and the int4 kernel, as us and
            as GB/s of the bytes each reads, next to the copy bandwidth; the int4 kernel checked against the
            dequantized product (GPU only). `--before`: also the int4 kernel before packed fp16 arithmetic (kept
            here as a candidate); `--sweep`: each of the int4 kernel's configurations, timed the same way;
  mixtral   full Mixtral-8x7B (32 layers) with int4 weights: memory after loading, with a 4k cache, and the peak
            while it decodes 16 greedy tokens (eager: the int4 kernel and the chosen experts dequantized), as
            torch allocates it and as the device has it in use (CUDA context included); target <= 28 GB;
  configs   every configuration the int4 kernel may be tuned to, dense and over stacked experts (Mixtral's w13 with
            SwiGLU and w2), each output against the dequantized product: the autotuner's pick is only one of them;
  decode    Mistral-7B batch-1 decode, compiled into CUDA graphs as `mistral-chat bench` runs it, bf16 / int8 /
            int4 (each the same as `python3 -m mistral_chat.bench.run --shape mistral-7b --quantize int4 --batch 1
            --steps 64 --prefill ""`), and int4's speed-up over int8 (target: >= 1.5x).

    python3 benchmarks/gpu/int4_check.py                       # all four, ~3 min on an H100
    python3 benchmarks/gpu/int4_check.py --parts products,decode --modes int8,int4 --before --sweep
    python3 benchmarks/gpu/int4_check.py --parts error,mixtral
    python3 benchmarks/gpu/int4_check.py --parts configs
    python3 benchmarks/gpu/int4_check.py --parts mixtral --int4-experts triton
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

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: no GPU parts
    triton = None

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


def copies(nbytes: int, *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Enough copies of the tensors (nbytes together) to fill 400 MB: each timed call reads its weight from memory,
    not from the 50 MB L2."""
    return [tuple(t.clone() for t in tensors) for _ in range(max(1, -(-400_000_000 // nbytes)))]


# name: (rows, columns, SwiGLU): the products as decode runs them
PRODUCTS = {"wqkv": (6144, 4096, False), "wo": (4096, 4096, False), "w13": (28672, 4096, True),
            "w2": (4096, 14336, False), "output": (32768, 4096, False)}


def part_products(dev: torch.device, before: bool, sweep: bool) -> None:
    """Mistral-7B's batch-1 products alone: bf16, int8 kernel, int4 kernel (and the kernel before, with `before`),
    each timed call reading another copy of its weight out of enough copies to fill 400 MB (as in decode, from
    memory, not the 50 MB L2); with `sweep`, the int4 kernel in each of its configurations."""
    from mistral_chat.engine.kernels import fused, int4_gemv, int8_gemv

    bandwidth = copy_bandwidth(dev) / GB
    print(f"\n[products] batch-1 products in CUDA graphs; copy bandwidth {bandwidth:.0f} GB/s; int4: packed fp16 "
          f"kernel{', before: the float32 kernel it replaced' if before else ''}")
    print(f"{'product':8} {'bf16 us':>8} {'GB/s':>6} {'int8 us':>8} {'GB/s':>6} {'int4 us':>8} {'GB/s':>6} "
          f"{'int4/int8':>9}{' before us   GB/s' if before else ''}  int4 kernel vs dequantized")
    sweeps = {}
    for name, (n, k, swiglu) in PRODUCTS.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        q8, s8 = quantize_rows(w)
        codes, scale, low = int4.quantize_groups(w, int4.group_size(k))
        packed = int4.pack(codes)
        del codes
        tiled = int4.tile(packed, scale, low)  # the kernel's layout
        got = int4_gemv.int4_linear(x, *tiled, swiglu=swiglu)
        want = F.linear(x.float(), int4.dequantize(packed, scale, low, torch.float32))
        if swiglu:
            want = fused.silu_and_mul(want.to(x.dtype), kernel=True).float()
        error = rel(got, want)
        b16, b8 = n * k * 2, n * k + n * 2
        b4 = packed.numel() + (scale.numel() + low.numel()) * 2

        w16, w8, w4 = copies(b16, w), copies(b8, q8, s8), copies(b4, *tiled)
        t16 = graph_time(lambda i: F.linear(x, w16[i][0]), len(w16))
        t8 = graph_time(lambda i: int8_gemv.int8_linear(x, *w8[i], swiglu=swiglu), len(w8))
        t4 = graph_time(lambda i: int4_gemv.int4_linear(x, *w4[i], swiglu=swiglu), len(w4))
        old = ""
        if before:  # rows in their own order
            old_error = rel(_before_int4(x, packed, scale, low, swiglu), want)
            plain = copies(b4, packed, scale, low)
            t0 = graph_time(lambda i: _before_int4(x, *plain[i], swiglu), len(plain))
            del plain
            old = f" {t0 * 1e6:9.1f} {b4 / t0 / GB:6.0f}" + (f" (rel {old_error:.1e})" if old_error > 3e-2 else "")
        if sweep:
            sweeps[name] = [(config, _config_time(x, w4, swiglu, config)) for config in _int4_configs()]
        del w16, w8, w4
        verdict = "ok" if error < 3e-2 else "WRONG"  # bf16 roundings: ~3e-3; a wrong kernel: ~1
        print(f"{name:8} {t16 * 1e6:8.1f} {b16 / t16 / GB:6.0f} {t8 * 1e6:8.1f} {b8 / t8 / GB:6.0f} {t4 * 1e6:8.1f} "
              f"{b4 / t4 / GB:6.0f} {t8 / t4:8.2f}x{old}  rel {error:.1e} {verdict}")
        del w, q8, s8, packed, scale, low, tiled
    print("int4 kernel configs chosen:", {str(k): str(v) for k, v in int4_gemv._int4_gemv_kernel.cache.items()}
          if hasattr(int4_gemv._int4_gemv_kernel, "cache") else "n/a")
    print("int4 splits chosen:", {name: int4_gemv.split_for(n // (2 if swiglu else 1) // 32, k // 128, dev)
                                  for name, (n, k, swiglu) in PRODUCTS.items()})
    for name, times in sweeps.items():
        best = min(t for _, t in times)
        print(f"\n[sweep] {name}: us per configuration (U, warps, split[, maxnreg]), best first")
        for config, t in sorted(times, key=lambda ct: ct[1])[:10]:
            cap = f", {config['maxnreg']}" if "maxnreg" in config else ""
            label = f"({config['U']}, {config['WARPS']}, split {config['SPLIT']}{cap})"
            print(f"  {label:18} {t * 1e6:8.1f} us {t / best:6.2f}x")


def _int4_configs(capped: bool = True) -> list[dict]:
    """The int4 kernel's autotuned configurations, as keyword arguments of int4_gemv.launch, and (`capped`) those
    of 4 and 8 quads a step again with their registers capped (`maxnreg`: more programs resident on an SM)."""
    from mistral_chat.engine.kernels import int4_gemv

    configs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, SPLIT=split)
               for split in (1, 2, 4, 8) for c in int4_gemv._CONFIGS]
    caps = {4: (64,), 8: (64, 96)} if capped else {}
    return configs + [dict(c, maxnreg=cap) for c in configs for cap in caps.get(c["U"], ()) if c["SPLIT"] == 1]


def _config_time(x: torch.Tensor, copies: list, swiglu: bool, config: dict) -> float:
    """Seconds a call of the int4 kernel takes in `config`, as graph_time times it."""
    from mistral_chat.engine.kernels import int4_gemv

    parts = 2 if swiglu else 1
    out = torch.empty(copies[0][0].shape[0] // parts, dtype=x.dtype, device=x.device)
    row = x.reshape(-1)
    return graph_time(lambda i: int4_gemv.launch(row, *copies[i], out, parts, True, **config), len(copies))


def part_configs(dev: torch.device) -> None:
    """Each of the int4 kernel's configurations, dense and over stacked experts, against the dequantized product."""
    from mistral_chat.engine.kernels import fused, int4_gemv

    gen = torch.Generator(device=dev).manual_seed(5)
    experts = torch.tensor([3, 1], device=dev)
    print("\n[configs] relative error of each configuration against the dequantized product (ok below 3e-2)")
    for name, n, k, swiglu in (("w13", 28672, 4096, True), ("w2", 4096, 14336, False)):
        w = torch.randn(4, n, k, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
        codes, scale, low = int4.quantize_groups(w, int4.group_size(k))
        packed = int4.pack(codes)
        del codes, w
        tiled = [t.clone() for t in (packed, scale, low)]  # the kernel's layout, one expert at a time
        for e in range(4):
            tiled[0][e], tiled[1][e], tiled[2][e] = int4.tile(packed[e], scale[e], low[e])
        parts = 2 if swiglu else 1
        x = torch.randn(2, k, device=dev, dtype=torch.bfloat16, generator=gen)
        want = []
        for slot, e in enumerate(experts.tolist()):
            full = F.linear(x[slot:slot + 1].float(), int4.dequantize(packed[e], scale[e], low[e], torch.float32))
            want.append(fused.silu_and_mul(full.to(x.dtype), kernel=True).float() if swiglu else full)
        for config in _int4_configs(capped=False):
            dense = torch.empty(n // parts, dtype=x.dtype, device=dev)
            int4_gemv.launch(x[0], *(t[3] for t in tiled), dense, parts, True, **config)
            stacked = torch.empty(2, n // parts, dtype=x.dtype, device=dev)
            int4_gemv.launch(x, *tiled, stacked, parts, True, experts=experts, **config)
            errors = [rel(dense, want[0][0])] + [rel(stacked[s], want[s][0]) for s in range(2)]
            verdict = "ok" if max(errors) < 3e-2 else "WRONG"
            print(f"{name} {config}: dense {errors[0]:.1e}, experts {errors[1]:.1e} {errors[2]:.1e} {verdict}",
                  flush=True)


def part_mixtral(dev: torch.device, shape: str, layers: int | None, steps: int, int4_experts: str | None) -> None:
    """Full Mixtral with int4 weights: memory held after loading, with a 4k cache, and at its peak while decoding
    (torch's allocations, and the device's memory in use: the CUDA context and the allocator's cache included);
    the loader's estimate; greedy decode."""
    if shape == "tiny":  # a CPU smoke test: the tiny shape with 4 experts
        config = SHAPES["tiny"].with_(num_experts=4, num_experts_per_tok=2, sliding_window=None)
    else:
        config = bench_shape(shape, layers)
    cuda = dev.type == "cuda"

    def in_use() -> str:
        """torch's allocated and reserved memory and the device's memory in use, GB."""
        free, total = torch.cuda.mem_get_info(dev)
        return (f"allocated {(torch.cuda.memory_allocated(dev) - base) / GB:.2f} GB, reserved "
                f"{torch.cuda.memory_reserved(dev) / GB:.2f} GB, device in use {(total - free) / GB:.2f} GB")

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    started = time.perf_counter()
    plan = choose_plan(dev, torch.bfloat16, 1, "int4")
    if int4_experts:  # one token's experts through the int4 kernel ("triton") or dequantized ("torch")
        plan = plan.with_overrides({"int4_experts": int4_experts}, dev)
    model = random_model(config, dev, torch.bfloat16, "int4", plan)
    load_s = time.perf_counter() - started
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    estimate = estimate_memory(config, torch.bfloat16, 4096, quantize="int4")
    print(f"\n[mixtral] {shape}, {config.n_layers} layers, int4 ({load_s:.1f} s to build and quantize); plan: "
          f"{model.plan.describe()}")
    print(f"weights held {held / GB:.2f} GB; the loader's estimate: weights {estimate.weights / GB:.2f} GB + KV "
          f"cache {estimate.kv_cache / GB:.2f} GB = {estimate.total / GB:.2f} GB")
    if cuda:
        building = torch.cuda.max_memory_allocated(dev) - base
        print(f"after loading: {in_use()}; peaks while building and quantizing: allocated {building / GB:.2f} GB, "
              f"reserved {torch.cuda.max_memory_reserved(dev) / GB:.2f} GB")
    model.setup_cache(4096)
    if cuda:
        torch.cuda.synchronize()
        after_cache = torch.cuda.memory_allocated(dev) - base
        print(f"with a 4k cache: {in_use()}")
        torch.cuda.empty_cache()  # blocks cached from building: a card of 28 GB would have reused them
        torch.cuda.reset_peak_memory_stats(dev)
    gen = torch.Generator(device=dev).manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (1, 16), device=dev, generator=gen)
    out = []
    with torch.no_grad():
        logits = model(ids, 0)[:, -1]
        assert torch.isfinite(logits).all(), "prefill logits not finite"
        for pos in range(16, 16 + steps):
            if pos == 17:  # timed from the second step: the first compiles and tunes the kernels
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
            token = logits.argmax(-1)
            out.append(int(token))
            logits = model(token.view(1, 1), pos)[:, -1]
            assert torch.isfinite(logits).all(), f"decode logits not finite at {pos}"
        if cuda:
            torch.cuda.synchronize()
    per_token = (time.perf_counter() - started) / (steps - 1)
    print(f"greedy decode (eager, no CUDA graphs) of {steps} tokens after a 16-token prompt: {per_token * 1000:.1f} "
          f"ms/token after the first; tokens {out}")
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev) - base
        free, total = torch.cuda.mem_get_info(dev)
        context = total - free - torch.cuda.memory_reserved(dev)  # the CUDA context, libraries' own memory
        need = torch.cuda.max_memory_reserved(dev) + context
        print(f"while prefilling and decoding: peak allocated {peak / GB:.2f} GB (the weights and 4k cache: "
              f"{after_cache / GB:.2f} GB), peak reserved {torch.cuda.max_memory_reserved(dev) / GB:.2f} GB; "
              f"now {in_use()}")
        print(f"target <= 28 GB: the device's memory at its peak while decoding (peak reserved + {context / GB:.2f} "
              f"GB outside torch's allocator) = {need / GB:.2f} GB: {'met' if need <= 28 * GB else 'NOT met'}")
    _experts_agreement(model, ids, out)
    del model


def _experts_agreement(model, prompt: torch.Tensor, tokens: list[int]) -> None:
    """One token's int4 experts read in place by the kernel (plan int4_experts=triton) against the gathered path
    (each chosen expert dequantized), teacher-forced on the same tokens, and each against the prefill path (every
    expert on its tokens) over the same positions: which decode path parts from the other two."""
    from mistral_chat.engine.kernels.fused import triton_runs
    from mistral_chat.engine.moe import MoEFeedForward

    moes = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    if not (triton_runs(prompt) and moes and moes[0].int4_tiled):
        return
    fed = torch.tensor([tokens[:-1]], device=prompt.device)
    runs, inputs = {}, {}
    for kernel in (True, False):
        for m in moes:  # the kernel, or the gathered path (each chosen expert untiled and dequantized)
            _use_kernel(m, kernel)
        model.setup_cache(64)
        with torch.no_grad():
            model(prompt, 0)
            seen = [[] for _ in moes]  # each MoE layer's input at each decode step
            hooks = [m.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach().clone()))
                     for i, m in enumerate(moes)]
            runs[kernel] = torch.cat([model(fed[:, i:i + 1], prompt.shape[1] + i)[:, -1] for i in
                                      range(fed.shape[1])]).float()
            for hook in hooks:
                hook.remove()
        inputs[kernel] = seen
    _routing_and_layers(moes, inputs, runs)
    for m in moes:
        _use_kernel(m, True)
    model.setup_cache(64)
    with torch.no_grad():
        full = model(torch.cat([prompt, fed], dim=1), 0, all_logits=True)[0, prompt.shape[1]:].float()

    print(f"teacher-forced over {fed.shape[1]} decode steps: the experts kernel against the gathered path: "
          f"{_agreement(runs[True], runs[False])}; the kernel against the prefill path: "
          f"{_agreement(runs[True], full)}; the gathered path against the prefill path: "
          f"{_agreement(runs[False], full)}")


def _agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    """How close logits a are to b ([steps, vocab]): relative L2, and where their top tokens differ, b's top-2 gap."""
    same = (a.argmax(-1) == b.argmax(-1)).tolist()
    top2 = b.topk(2, dim=-1).values
    gaps = [f"{g:.3f}" for g, s in zip((top2[:, 0] - top2[:, 1]).tolist(), same) if not s]
    return (f"logits within {rel(a, b):.1e} (relative L2), the same top token at {sum(same)} of {len(same)} "
            f"steps{' (top-2 gaps where not: ' + ', '.join(gaps) + ')' if gaps else ''}")


def _gate_gap(logits: torch.Tensor, k: int) -> float:
    """The gap between the k-th and (k+1)-th largest gate logits: how near the router is to choosing another."""
    top = logits.float().reshape(-1).topk(k + 1).values
    return float(top[k - 1] - top[k])


def _use_kernel(moe, kernel: bool) -> None:
    """One token's int4 experts through the kernel (as loaded), or through the gathered path."""
    if kernel:
        moe.__dict__.pop("_int4_kernel_takes", None)
    else:
        moe._int4_kernel_takes = lambda x: False


def _routing_and_layers(moes: list, inputs: dict, runs: dict) -> None:
    """Why two decode paths' logits part: where the two runs' routers chose other experts (a near-tie of the gate's
    logits flips on a rounding, and the layer's output changes wholesale), how close the logits stay before the
    first such step, and each MoE layer on the same input through both paths (the same experts by construction)."""
    steps = len(inputs[True][0])
    flips = [[not torch.equal(m.route(a)[0].sort(-1).values, m.route(b)[0].sort(-1).values)
              for a, b in zip(inputs[True][i], inputs[False][i])] for i, m in enumerate(moes)]
    flipped = [any(layer[s] for layer in flips) for s in range(steps)]
    first = flipped.index(True) if any(flipped) else steps
    closest = min(_gate_gap(m.gate(x), m.top_k) for m, xs in zip(moes, inputs[False]) for x in xs)
    print(f"routing: the two runs chose other experts at {sum(map(sum, flips))} of {len(moes) * steps} (layer, step) "
          f"pairs, the first at step {first}; the smallest gap between the last chosen and the first left-out gate "
          f"logit: {closest:.4f}")
    if first:
        print(f"before that step: {_agreement(runs[True][:first], runs[False][:first])}")
    worst = 0.0
    with torch.no_grad():
        for m, xs in zip(moes, inputs[False]):
            for x in xs:
                _use_kernel(m, True)
                a = m(x).float()
                _use_kernel(m, False)
                worst = max(worst, rel(a, m(x).float()))
                _use_kernel(m, True)
    print(f"each MoE layer on the same input (its experts the same): the kernel against the gathered path within "
          f"{worst:.1e} (relative L2, worst of {len(moes) * steps})")


def part_decode(dev: torch.device, shape: str, layers: int | None, modes: list[str], steps: int) -> None:
    """What `mistral-chat bench` times for batch-1 decode, one mode after another in this process."""
    from mistral_chat.engine.kernels import int4_gemv

    cuda = dev.type == "cuda"
    ms = {}
    split_for = int4_gemv.split_for
    for mode in modes:
        quantize = None if mode == "bf16" else mode.removesuffix("-nosplit")
        int4_gemv.split_for = (lambda *_: 1) if mode.endswith("-nosplit") else split_for  # a comparison only
        result = run_bench(shape, str(dev), "bfloat16", layers, prompt=512 if cuda else 16, steps=steps,
                           batches=[1], compile=cuda, quantize=quantize, prefill_lengths=[])
        int4_gemv.split_for = split_for
        print(f"\n[decode] {mode}")
        print(format_table(result))
        ms[mode] = next(r["ms"] for r in result.rows if r["what"].startswith("decode after"))
        torch.cuda.empty_cache() if cuda else None
    if "int8" in ms and "int4" in ms:
        print(f"\n[decode] int4 {ms['int4']:.2f} ms/token, int8 {ms['int8']:.2f}: int4 {ms['int8'] / ms['int4']:.2f}x "
              f"int8's speed (target >= 1.5x)")


# The int4 kernel before packed fp16 arithmetic (commit 36e5e9c's kernels/int4_gemv.py, its 12 configurations), a
# candidate for `--before` only: each code became a float32 with an AND-OR into the mantissa of 2**23, a
# subtraction and a multiply-add.
if triton is not None:
    from mistral_chat.engine.kernels.gemv import _store_rows

    _BEFORE_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=warps, num_stages=s)
                       for n, w, warps, s in ((8, 128, 4, 1), (16, 64, 4, 1), (4, 256, 4, 1), (8, 128, 4, 3),
                                              (4, 128, 4, 4), (2, 256, 4, 3), (16, 128, 8, 2), (8, 256, 8, 2),
                                              (32, 64, 8, 2), (1, 512, 4, 3), (2, 128, 2, 4), (4, 64, 2, 4))]
    _MAGIC = tl.constexpr(0x4B000000)  # the float32 bits of 2**23
    _TWO23 = tl.constexpr(8388608.0)

    @triton.jit
    def _before_code_times_x(src, x, SHIFT: tl.constexpr):
        value = ((src & (15 << SHIFT)) | _MAGIC).to(tl.float32, bitcast=True) - _TWO23
        return value * (x * (1.0 / (1 << SHIFT)))[None, :]

    @triton.autotune(configs=_BEFORE_CONFIGS, key=["N", "WORDS", "GROUP", "PARTS"])
    @triton.jit
    def _before_kernel(x_ptr, w_ptr, scale_ptr, low_ptr, out_ptr, N, WORDS, stride_wn, stride_sn, UP,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PARTS: tl.constexpr):
        r = tl.arange(0, BLOCK_N * PARTS)
        units = tl.program_id(0) * BLOCK_N + r // PARTS
        rows = units + (r % PARTS) * UP
        row_ok = units < N
        acc = tl.zeros((BLOCK_N * PARTS, BLOCK_W), dtype=tl.float32)
        for w0 in range(0, WORDS, BLOCK_W):
            words = w0 + tl.arange(0, BLOCK_W)
            word_ok = words < WORDS
            ok = row_ok[:, None] & word_ok[None, :]
            packed = tl.load(w_ptr + rows[:, None] * stride_wn + words[None, :], mask=ok, other=0)
            groups = (words * 8) // GROUP
            scale = tl.load(scale_ptr + rows[:, None] * stride_sn + groups[None, :], mask=ok, other=0.0)
            low = tl.load(low_ptr + rows[:, None] * stride_sn + groups[None, :], mask=ok, other=0.0)
            high = packed >> 12
            part = tl.zeros((BLOCK_N * PARTS, BLOCK_W), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_W,), dtype=tl.float32)
            for j in tl.static_range(8):
                x = tl.load(x_ptr + words * 8 + j, mask=word_ok, other=0.0).to(tl.float32)
                xsum += x
                if j < 5:
                    part += _before_code_times_x(packed, x, 4 * j)
                else:
                    part += _before_code_times_x(high, x, 4 * (j - 3))
            acc += part * scale.to(tl.float32) + low.to(tl.float32) * xsum[None, :]
        _store_rows(out_ptr, tl.sum(acc, axis=1), tl.program_id(0) * BLOCK_N, N, BLOCK_N, PARTS)


def _before_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                 swiglu: bool) -> torch.Tensor:
    """x ([1, K]) times the int4 weight with the kernel before packed fp16 arithmetic, as int4_linear took it."""
    k, parts = x.shape[-1], 2 if swiglu else 1
    n = weight.shape[0] // parts
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _before_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x.reshape(k), weight.view(torch.int32), scale, low, out, n, k // 8, weight.stride(0) // 4, scale.stride(0),
        n, GROUP=k // scale.shape[-1], PARTS=parts)
    return out.reshape(*x.shape[:-1], n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", default="error,products,mixtral,decode")
    parser.add_argument("--shape", default="mistral-7b", help="the dense shape (error, decode)")
    parser.add_argument("--layers", type=int, default=None, help="layers of the dense shape in decode (all)")
    parser.add_argument("--mixtral-shape", default="mixtral-8x7b", help="mixtral-8x7b, or tiny (CPU smoke test)")
    parser.add_argument("--mixtral-layers", type=int, default=None, help="Mixtral's layers (all 32)")
    parser.add_argument("--int4-experts", choices=("triton", "torch"), help="mixtral: the plan's int4_experts "
                        "(default: the loader's choice)")
    parser.add_argument("--modes", default="bf16,int8,int4", help="decode: which weights (int4-nosplit: int4 with "
                        "each block's columns in one program)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--before", action="store_true", help="products: also the int4 kernel before packed fp16")
    parser.add_argument("--sweep", action="store_true", help="products: each configuration of the int4 kernel")
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
            part_products(dev, args.before, args.sweep)
        else:
            print("\n[products] skipped: GPU only")
    if "configs" in parts:
        if dev.type == "cuda":
            part_configs(dev)
        else:
            print("\n[configs] skipped: GPU only")
    if "mixtral" in parts:
        part_mixtral(dev, args.mixtral_shape, args.mixtral_layers, 16 if dev.type == "cuda" else 4, args.int4_experts)
    if "decode" in parts:
        part_decode(dev, args.shape, args.layers, args.modes.split(","), args.steps)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
