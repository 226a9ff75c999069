"""`mistral-chat bench`: speed of the engine on random weights of a real model shape, next to the floor.

Run as `mistral-chat bench --shape mistral-7b` or `python -m mistral_chat.bench --shape mistral-7b`.
It measures the device's copy bandwidth, builds random weights of the shape on the device (no download),
times prefill and decode at batch 1 and 8, and reports tokens/s next to the bandwidth floor
(weight bytes read per token / copy bandwidth) and, with --vs-hf, next to HF transformers on the same shape in
the same process (eager, and static cache + torch.compile).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from mistral_chat.bench.command import BenchArgs, int_list, parse_plan, parse_worlds
from mistral_chat.bench.shapes import SHAPES, bench_shape  # noqa: F401 - SHAPES: the shapes this benchmark builds
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.decode import DecodeStep, prefill
from mistral_chat.engine.generate import TokenReader
from mistral_chat.engine.model import Transformer
from mistral_chat.errors import MistralChatError



@dataclass
class BenchResult:
    shape: str
    device: str
    dtype: str
    quantize: str | None
    layers: int
    copy_bandwidth_gbs: float = 0.0  # on the CPU: the memory's read bandwidth (`read_bandwidth`)
    bandwidth: str = "copy"  # what copy_bandwidth_gbs measured: "copy" (GPUs) or "read" (the CPU)
    weight_bytes_per_token: int = 0
    floor_ms_per_token: float = 0.0
    floor_tokens_per_s: float = 0.0
    plan: str = ""
    rows: list[dict] = field(default_factory=list)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds, with the device synchronised around each run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeat=20, warmup=3)
    del src, dst
    return 2 * n * 2 / seconds


def read_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """The memory's read bandwidth in bytes/s: the sum of a float32 tensor of `gib` GiB (several times a server's
    last-level cache; a CPU's decode streams its weights the same way, through every core)."""
    src = torch.ones(int(gib * 2**30) // 4, device=device)
    seconds = timed(lambda: src.sum(), device, repeat=5, warmup=1)
    del src
    return gib * 2**30 / seconds


def weight_bytes_per_token(model: torch.nn.Module, config: ModelConfig) -> int:
    """Bytes of weights one decode step reads: all but the embedding table (one row), and for MoE only the
    chosen experts."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("tok_embeddings") or ".cache." in name or name.startswith("slots") or name == "rope":
            continue
        nbytes = t.numel() * t.element_size()
        if config.is_moe and (name.endswith("feed_forward.w13") or name.endswith("feed_forward.w2")
                              or name.endswith("_scale") or name.endswith("_low")):  # int8 / int4 experts
            nbytes = nbytes * config.num_experts_per_tok // config.num_experts
        total += nbytes
    return total


def bench_ours(model: Transformer, config: ModelConfig, device: torch.device, prompt: int, steps: int,
               batches: list[int], compile: bool | None, prefill_lengths: list[int]) -> list[dict]:
    """`compile` None: decode as the model's plan says (bench's --plan compile_decode=0,decode_graphs=1 compares)."""
    rows = []
    vocab = config.vocab_size
    if compile is None:
        compile = model.plan.compile_decode
    label = "mistral-chat " + ("compiled" if compile else "graphs" if model.plan.decode_graphs and
                               device.type == "cuda" else "eager")
    max_len = max(prefill_lengths, default=0)
    model.setup_cache(max_len + 8, batch=1, prefill_chunk=max_len)
    for length in prefill_lengths:
        tokens = torch.randint(0, vocab, (1, length), device=device)

        def run_prefill() -> None:
            assert model.slots is not None
            model.slots.reset()
            prefill(model, tokens, 0)

        started = time.perf_counter()
        run_prefill()
        warm_seconds = time.perf_counter() - started
        seconds = timed(run_prefill, device, repeat=10, warmup=2)
        rows.append({"engine": "mistral-chat eager",
                     "what": f"prefill {length}", "batch": 1,
                     "ms": seconds * 1000, "tokens_per_s": length / seconds, "warmup_s": warm_seconds})
    for batch in batches:
        model.setup_cache(prompt + steps + 16, batch=batch, prefill_chunk=prompt)
        step = DecodeStep(model, compile=compile)
        tokens = torch.randint(0, vocab, (batch, prompt), device=device)
        with torch.no_grad():
            logits = model(tokens, 0)[:, -1]
        started = time.perf_counter()
        pos = prompt
        for _ in range(3):  # warm-up, compiles the graph(s)
            nxt = logits.argmax(-1)
            logits = step(nxt.view(batch, 1), pos)
            pos += 1
        warm_seconds = time.perf_counter() - started

        reader = TokenReader(device)

        def decode_run(run_ahead: bool = True) -> None:
            nonlocal logits
            p = pos
            for _ in range(steps):
                nxt = logits.argmax(-1)
                reader.start(nxt)
                if not run_ahead:  # the host learns each token before it queues the next step
                    reader.value()
                logits = step(nxt.view(batch, 1), p)
                if run_ahead:  # the host learns each token while the next step runs, as the chat loop does
                    reader.value()
                p += 1

        seconds = timed(decode_run, device, repeat=3, warmup=1)
        rows.append({"engine": label, "what": f"decode after {prompt}", "batch": batch, "ms": seconds / steps * 1000,
                     "tokens_per_s": batch * steps / seconds, "warmup_s": warm_seconds})
        if batch == 1:  # what running ahead of the host gains (nothing on the CPU, which runs each step at once)
            seconds = timed(lambda: decode_run(run_ahead=False), device, repeat=3, warmup=1)
            rows.append({"engine": label, "what": "decode step by step", "batch": batch, "ms": seconds / steps * 1000,
                         "tokens_per_s": batch * steps / seconds})
    return rows


def hf_model(config: ModelConfig, device: torch.device, dtype: torch.dtype):
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
                  num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                  num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
                  max_position_embeddings=config.max_seq_len, sliding_window=config.sliding_window,
                  rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps, tie_word_embeddings=False)
    with torch.device(device):
        if config.is_moe:
            cfg = MixtralConfig(num_local_experts=config.num_experts,
                                num_experts_per_tok=config.num_experts_per_tok, **common)
            model = MixtralForCausalLM(cfg)
        else:
            model = MistralForCausalLM(MistralConfig(**common))
    return model.to(dtype).eval()


def bench_hf(config: ModelConfig, device: torch.device, dtype: torch.dtype, prompt: int, steps: int,
             prefill_lengths: list[int]) -> list[dict]:
    model = hf_model(config, device, dtype)
    rows = []
    for length in prefill_lengths:
        tokens = torch.randint(0, config.vocab_size, (1, length), device=device)
        with torch.no_grad():
            seconds = timed(lambda: model(tokens, use_cache=False), device, repeat=5, warmup=2)
        rows.append({"engine": "transformers eager", "what": f"prefill {length}", "batch": 1,
                     "ms": seconds * 1000, "tokens_per_s": length / seconds})
    ids = torch.randint(0, config.vocab_size, (1, prompt), device=device)
    mask = torch.ones_like(ids)
    for label, cache in (("transformers eager", None), ("transformers static+compile", "static")):
        model.generation_config.cache_implementation = cache

        def gen(n: int) -> None:
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)

        started = time.perf_counter()
        gen(steps + 1)
        gen(steps + 1)
        warm = time.perf_counter() - started
        one = timed(lambda: gen(1), device, repeat=3, warmup=1)
        full = timed(lambda: gen(steps + 1), device, repeat=3, warmup=0)
        per_token = (full - one) / steps
        rows.append({"engine": label, "what": f"decode after {prompt}", "batch": 1, "ms": per_token * 1000,
                     "tokens_per_s": 1 / per_token, "warmup_s": warm})
    del model
    return rows


def run_bench(shape: str, device: str = "auto", dtype: str = "bfloat16", layers: int | None = None,
              prompt: int = 512, steps: int = 128, batches: list[int] | None = None, compile: bool = True,
              quantize: str | None = None, vs_hf: bool = False, prefill_lengths: list[int] | None = None,
              window: int | None = None, plan_overrides: dict[str, str] | None = None) -> BenchResult:
    from mistral_chat.engine.loader import DTYPES, random_model, resolve_device
    from mistral_chat.engine.plan import choose_plan

    config = bench_shape(shape, layers, window)
    dev = resolve_device(device)
    torch_dtype = DTYPES[dtype]
    batches = batches or [1, 8]
    prefill_lengths = prefill_lengths if prefill_lengths is not None else [prompt, 2048]
    result = BenchResult(shape=shape, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                         dtype=dtype, quantize=quantize, layers=config.n_layers)
    if dev.type == "cuda":
        result.copy_bandwidth_gbs = copy_bandwidth(dev, 1.0) / 1e9
    else:  # a CPU's copy of a small tensor stays in its cache: time reading one larger than the cache instead
        result.copy_bandwidth_gbs, result.bandwidth = read_bandwidth(dev, 1.0) / 1e9, "read"
    plan = choose_plan(dev, torch_dtype, 1, quantize, compile).with_overrides(plan_overrides or {}, dev)
    result.plan = plan.describe()
    model = random_model(config, dev, torch_dtype, quantize, plan)
    result.weight_bytes_per_token = weight_bytes_per_token(model, config)
    result.floor_ms_per_token = result.weight_bytes_per_token / (result.copy_bandwidth_gbs * 1e9) * 1000
    result.floor_tokens_per_s = 1000 / result.floor_ms_per_token
    result.rows += bench_ours(model, config, dev, prompt, steps, batches, None, prefill_lengths)
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if vs_hf:
        result.rows += bench_hf(config, dev, torch_dtype, prompt, steps, prefill_lengths)
    for row in result.rows:
        if row["what"].startswith("decode") and row["batch"] == 1:
            row["floor_pct"] = 100 * result.floor_ms_per_token / row["ms"]
    return result


def format_table(result: BenchResult) -> str:
    lines = [f"{result.shape} ({result.layers} layers, {result.dtype}"
             f"{', ' + result.quantize if result.quantize else ''}) on {result.device}",
             f"{'memory read' if result.bandwidth == 'read' else 'copy'} bandwidth "
             f"{result.copy_bandwidth_gbs:.0f} GB/s; weights read per token "
             f"{result.weight_bytes_per_token / 1e9:.2f} GB; floor {result.floor_ms_per_token:.2f} ms/token "
             f"({result.floor_tokens_per_s:.0f} tokens/s)",
             result.plan,
             f"{'engine':30} {'what':20} {'batch':>5} {'ms':>9} {'tokens/s':>10} {'% floor':>8} {'warm-up s':>9}"]
    for r in result.rows:
        pct = f"{r['floor_pct']:.0f}%" if "floor_pct" in r else ""
        warm = f"{r['warmup_s']:.1f}" if "warmup_s" in r else ""  # first runs: compiling, when compiled
        lines.append(f"{r['engine']:30} {r['what']:20} {r['batch']:>5} {r['ms']:>9.2f} "
                     f"{r['tokens_per_s']:>10.1f} {pct:>8} {warm:>9}")
    return "\n".join(lines)


def main_parallel(a: BenchArgs) -> int:
    from mistral_chat.bench.parallel import describe_run, format_parallel_table, result_json, run_parallel_bench

    def tell(run: Any) -> None:
        print(describe_run(run), file=sys.stderr, flush=True)

    result = run_parallel_bench(a.shape, parse_worlds(a.tp), a.dtype, a.quantize, a.layers, a.prompt, a.steps,
                                a.device, checkpoint_dir=a.tp_checkpoint, window=a.window, compile=not a.no_compile,
                                on_run=tell)
    text = result_json(result)
    if a.json_file:
        with open(a.json_file, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text if a.json else format_parallel_table(result))
    return 0 if any(r.status == "ok" for r in result.runs) else 1


def run(a: BenchArgs) -> int:
    """The benchmark the options ask for: the table (or JSON) on stdout; exit status 0 when it ran."""
    if a.tp is not None and parse_worlds(a.tp) != (1,):
        return main_parallel(a)
    batches = int_list(a.batch, "--batch")
    prefill_lengths = int_list(a.prefill, "--prefill") if a.prefill is not None else None
    overrides = parse_plan(a.plan)
    try:
        result = run_bench(a.shape, a.device, a.dtype, a.layers, a.prompt, a.steps, batches, not a.no_compile,
                           a.quantize, a.vs_hf, prefill_lengths, a.window, overrides)
    except ValueError as exc:
        if not overrides:
            raise
        raise MistralChatError(f"--plan {a.plan}: {exc}") from None  # a field, value or device the plan refuses
    text = json.dumps(asdict(result), indent=2)
    if a.json_file:
        with open(a.json_file, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text if a.json else format_table(result))
    return 0


if __name__ == "__main__":
    from mistral_chat.bench.command import main

    sys.exit(main())
