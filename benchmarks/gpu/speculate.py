"""Speculative decoding (engine/speculate.py) on random weights of a real shape, batch 1.

(a) The time of a verify step over N + 1 = 2, 4, 8, 16 positions (the eager pass captured in CUDA graphs,
    speculate.VerifyStep) against one decode step, compiled (DecodeStep, compile=True: CUDA graphs) and graphed
    (the eager step in CUDA graphs, decode.GraphedStep), all at the same position after the prompt.
(b) A model-free acceptance check: random weights accept no real draft, so the greedy continuation is decoded
    plainly first, then the product's speculative loop (speculate.Speculator: drafts, verify, acceptance, cache
    rewind, self-switch-off, run-ahead plain steps) runs with a drafter that proposes that continuation with the
    draft at index a * N (rounded) of every verify corrupted: acceptance a = 0, 25, 50, 75, 100%. Tokens/s against
    plain decoding (the same loop with no drafts: run-ahead compiled steps, as Session without --speculate), and
    whether the tokens equal the plain ones (bf16 verify products may round differently from decode's; a
    difference is reported, not hidden). At 0% the gate pauses drafting after 32 rejected draft tokens: that is
    the product's loss when nothing matches.

First, a check: on the tiny shape in float32, with a cache that wraps, greedy tokens with speculation (forced
drafts, N = 1, 4, 8, 15) equal plain decoding's; the script exits 1 at the end if not.

    python3 benchmarks/gpu/speculate.py                       # mistral-7b, bf16, one GPU (about 90 s on an H100)
    python3 benchmarks/gpu/speculate.py --no-compile          # graphed decode only (no 40-50 s compile)
    python3 benchmarks/gpu/speculate.py --no-compile --quantize int4   # int4 weights
    python3 benchmarks/gpu/speculate.py --device cpu --shape tiny --tokens 48 --reps 3   # a CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from mistral_chat.bench.shapes import SHAPES  # noqa: E402
from mistral_chat.engine.decode import DecodeStep  # noqa: E402
from mistral_chat.engine.generate import TokenReader  # noqa: E402
from mistral_chat.engine.loader import random_model  # noqa: E402
from mistral_chat.engine.plan import choose_plan  # noqa: E402
from mistral_chat.engine.sampling import SamplingParams  # noqa: E402
from mistral_chat.engine.speculate import AcceptanceGate, Speculator, VerifyStep  # noqa: E402
from mistral_chat.engine.stats import GenerationStats  # noqa: E402

VERIFY_POSITIONS = (2, 4, 8, 16)
ACCEPTANCE = (0.0, 0.25, 0.5, 0.75, 1.0)
DRAFTS = (4, 8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_call(fn, device: torch.device, reps: int) -> float:
    """Seconds per call of fn, back to back (captures and compiles in the two calls before)."""
    fn()
    fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - started) / reps


class NoDrafts:
    def append(self, token: int) -> None:
        pass

    def match(self) -> None:
        return None

    def draft(self, n: int) -> list[int]:
        return []


class ForcedDrafts:
    """Proposes the known continuation `truth`, with the draft at index `wrong_at` of every draft corrupted (none
    when wrong_at >= n): each verify accepts exactly min(wrong_at, n) drafts while the answer follows `truth`."""

    def __init__(self, prompt_len: int, truth: list[int], acceptance: float, vocab: int) -> None:
        self.length = prompt_len
        self.start = prompt_len
        self.truth = truth
        self.acceptance = acceptance
        self.vocab = vocab

    def append(self, token: int) -> None:
        self.length += 1

    def match(self) -> int:
        return 0

    def draft(self, n: int) -> list[int]:
        done = self.length - self.start
        out = list(self.truth[done:done + n])
        wrong_at = int(self.acceptance * n + 0.5)
        if wrong_at < len(out):
            out[wrong_at] = (out[wrong_at] + 1) % self.vocab
        return out


def answer(model, decode, verify, prompt: torch.Tensor, count: int, n: int, drafter, context: int,
           run_ahead: bool) -> tuple[list[int], float, GenerationStats]:
    """`count` greedy tokens after `prompt` through the product's loop; (tokens, seconds after the prefill, stats)."""
    device = prompt.device
    model.slots.reset()
    tokens: list[int] = []
    with torch.no_grad():
        for start in range(0, prompt.shape[1], model.slots.max_chunk):
            logits = model(prompt[:, start:start + model.slots.max_chunk], start)[:, -1]
    tokens.extend(prompt[0].tolist())
    stats = GenerationStats()
    spec = Speculator(model, decode, verify, tokens, SamplingParams(), None, n, drafter, context,
                      TokenReader(device), run_ahead, stats, AcceptanceGate())
    sync(device)
    started = time.perf_counter()
    out = [spec.first(logits)]
    for i in range(1, count):
        out.append(spec.advance(out[-1], count - i))
    sync(device)
    return out, time.perf_counter() - started, stats


def check_tiny(device: torch.device) -> bool:
    """Greedy tokens with speculation equal plain decoding's on the device, in float32, on the tiny shape with a
    cache that wraps (window 64, chunk 32: 95 slots; 100-token prompt, 200-token answer), graphed decode and verify
    steps where the device has CUDA graphs: a check of the verify graphs, the rewinds and the rotating cache."""
    config = SHAPES["tiny"]
    plan = dataclasses.replace(choose_plan(device, torch.float32, 1, None), decode_graphs=device.type == "cuda")
    model = random_model(config, device, torch.float32, None, plan)
    model.setup_cache(512, prefill_chunk=32)
    prompt = torch.randint(0, config.vocab_size, (1, 100), device=device,
                           generator=torch.Generator(device=device).manual_seed(2))
    decode, verify, cuda = DecodeStep(model, compile=False), VerifyStep(model), device.type == "cuda"
    truth, _, _ = answer(model, decode, verify, prompt, 200, 0, NoDrafts(), 512, cuda)
    ok = True
    for n in (1, 4, 8, 15):
        for acceptance in (0.5, 1.0):
            drafter = ForcedDrafts(100, truth, acceptance, config.vocab_size)
            out, _, stats = answer(model, decode, verify, prompt, 200, n, drafter, 512, cuda)
            same = out == truth
            ok &= same and stats.accepted_tokens > 0
            print(f"check tiny float32, cache wrapping: N={n} forced {acceptance:.0%}: accepted "
                  f"{stats.accepted_tokens}/{stats.drafted_tokens}, tokens {'equal' if same else 'DIFFER'}",
                  flush=True)
    return ok


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, help="cut the shape to this many layers")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--tokens", type=int, default=128, help="tokens per answer in (b)")
    p.add_argument("--reps", type=int, default=50, help="calls per timing in (a)")
    p.add_argument("--no-compile", action="store_true", help="no compiled decode step (graphed steps only)")
    p.add_argument("--skip-check", action="store_true", help="skip the tiny float32 equality check")
    p.add_argument("--quantize", choices=["int8", "int4"], help="int8 or int4 weights (verify steps of a few rows "
                   "through quant_rows' kernels)")
    a = p.parse_args()
    device = torch.device(a.device)
    checked = a.skip_check or check_tiny(device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    compiled = not a.no_compile
    config = SHAPES[a.shape] if not a.layers else SHAPES[a.shape].with_(n_layers=a.layers)
    plan = dataclasses.replace(choose_plan(device, dtype, 1, a.quantize), decode_graphs=cuda)
    started = time.perf_counter()
    model = random_model(config, device, dtype, a.quantize, plan)
    context = a.prompt + a.tokens + 64
    model.setup_cache(context)
    prompt = torch.randint(0, config.vocab_size, (1, a.prompt), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    with torch.no_grad():
        model(prompt, 0)
    print(f"{a.shape} layers {config.n_layers} {str(dtype).removeprefix('torch.')} on "
          f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}; model ready in "
          f"{time.perf_counter() - started:.1f} s", flush=True)

    # (a) step times at the position after the prompt
    position = a.prompt
    token = prompt[:, -1:].clone()
    graphed = DecodeStep(model, compile=False)  # on cuda: GraphedStep (plan.decode_graphs); on cpu: eager
    verify = VerifyStep(model)
    times: dict[str, float] = {}
    if compiled:
        t0 = time.perf_counter()
        step = DecodeStep(model, compile=True)
        times["decode, compiled"] = per_call(lambda: step(token, position), device, a.reps)
        print(f"compiled decode ready and timed in {time.perf_counter() - t0:.1f} s", flush=True)
    times["decode, graphed" if cuda else "decode, eager"] = per_call(lambda: graphed(token, position), device,
                                                                     a.reps)
    for t in VERIFY_POSITIONS:
        ids = torch.randint(0, config.vocab_size, (1, t), device=device)
        times[f"verify {t} positions"] = per_call(lambda: verify(ids, position), device, a.reps)
    base_name = "decode, compiled" if compiled else next(iter(k for k in times if k.startswith("decode")))
    base = times[base_name]

    # (b) the loop at controlled acceptance
    decode = step if compiled else graphed
    runs = []
    truth, plain_s, _ = answer(model, decode, verify, prompt, a.tokens, 0, NoDrafts(), context, cuda)
    truth, plain_s, _ = answer(model, decode, verify, prompt, a.tokens, 0, NoDrafts(), context, cuda)  # warm
    plain_rate = a.tokens / plain_s
    for n in DRAFTS:
        for acceptance in ACCEPTANCE:
            make = lambda: ForcedDrafts(a.prompt, truth, acceptance, config.vocab_size)  # noqa: E731
            answer(model, decode, verify, prompt, a.tokens, n, make(), context, cuda)  # captures
            out, seconds, stats = answer(model, decode, verify, prompt, a.tokens, n, make(), context, cuda)
            same = next((i for i, (x, y) in enumerate(zip(out, truth)) if x != y), None)
            runs.append((n, acceptance, stats, a.tokens / seconds, same))
            print(f"  N={n} acceptance {acceptance:.0%}: {a.tokens / seconds:.1f} tokens/s", flush=True)

    print(f"\n(a) one step at position {position} ({a.reps} calls back to back{', CUDA graphs' if cuda else ''})")
    print(f"{'step':<24}{'ms':>8}{'x ' + base_name:>28}")
    for name, seconds in times.items():
        print(f"{name:<24}{seconds * 1e3:>8.3f}{seconds / base:>27.2f}x")
    print(f"\n(b) {a.tokens} greedy tokens after {a.prompt}, drafts forced (model-free); plain "
          f"{plain_rate:.1f} tokens/s ({'compiled' if compiled else base_name.split(', ')[1]} decode, run-ahead)")
    print(f"{'N':>3}{'target':>8}{'accepted':>10}{'drafted':>9}{'tokens/s':>10}{'vs plain':>10}  tokens equal")
    for n, acceptance, stats, rate, same in runs:
        print(f"{n:>3}{acceptance:>8.0%}{stats.acceptance:>10.0%}{stats.drafted_tokens:>9}{rate:>10.1f}"
              f"{rate / plain_rate:>9.2f}x  {'yes' if same is None else f'no, from token {same}'}")
    print(f"total {time.perf_counter() - started:.1f} s")
    if not checked:
        print("FAILED: speculative tokens differ from plain decoding's in the tiny float32 check (above)")
        sys.exit(1)


if __name__ == "__main__":
    main()
