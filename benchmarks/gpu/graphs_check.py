"""Decode captured in CUDA graphs (decode.GraphedStep, the plan's decode_graphs) and compiled decode against the same
eager step run op by op, on random weights of a real shape, in bf16: greedy tokens run freely by each path (how many
agree with eager's before the first difference), and teacher-forced (each path fed eager's tokens: the largest
logit difference, how many greedy picks agree, and eager's margin between its top two logits where they do not:
random weights give near-ties, which any change of summation order flips), and the time of a step.

    python3 benchmarks/gpu/graphs_check.py [--shape mistral-7b] [--layers N] [--quantize int8] [--steps 32]
        [--no-compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from mistral_chat.bench.shapes import SHAPES
from mistral_chat.engine.decode import DecodeStep
from mistral_chat.engine.loader import random_model
from mistral_chat.engine.plan import choose_plan


def run(model, step, prompt: torch.Tensor, steps: int, forced: list[int] | None = None
        ) -> tuple[list[int], list[torch.Tensor], float]:
    """Greedy tokens after `prompt` through `step` (or, with `forced`, those tokens fed in), their logits, and the
    seconds per step after the first two (which capture graphs or compile)."""
    model.slots.reset()
    with torch.no_grad():
        logits = model(prompt, 0)[:, -1]
    tokens, all_logits = [], [logits.float()]
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(steps):
        token = logits.argmax(dim=-1) if forced is None else torch.tensor([forced[i]], device=prompt.device)
        tokens.append(int(token))
        if i == 2:
            torch.cuda.synchronize()
            started = time.perf_counter()
        logits = step(token.view(1, 1), prompt.shape[1] + i)
        all_logits.append(logits.float())
    torch.cuda.synchronize()
    return tokens, all_logits, (time.perf_counter() - started) / (steps - 2)


def compare(name: str, model, step, prompt: torch.Tensor, steps: int, eager_tokens: list[int],
            eager_logits: list[torch.Tensor]) -> str:
    free, _, seconds = run(model, step, prompt, steps)
    agree = next((i for i, (x, y) in enumerate(zip(free, eager_tokens)) if x != y), steps)
    _, forced_logits, _ = run(model, step, prompt, steps, forced=eager_tokens)
    diff = max(float((x - y).abs().max()) for x, y in zip(eager_logits, forced_logits))
    picks, margins = 0, []
    for x, y in zip(eager_logits, forced_logits):
        if int(x.argmax()) == int(y.argmax()):
            picks += 1
        else:
            top = x.flatten().topk(2).values
            margins.append(f"{float(top[0] - top[1]):.3g}")
    return (f"{name:9} free run: first {agree}/{steps} tokens as eager; fed eager's tokens: largest logit "
            f"difference {diff:.3g}, picks agree {picks}/{len(eager_logits)}"
            f"{' (eager top-2 margins where not: ' + ', '.join(margins) + ')' if margins else ''}; "
            f"{seconds * 1e3:.2f} ms/step")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--layers", type=int)
    p.add_argument("--quantize")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--no-compile", action="store_true", help="skip compiled decode (40-50 s)")
    a = p.parse_args()
    config = SHAPES[a.shape]
    if a.layers:
        config = config.with_(n_layers=a.layers)
    device = torch.device("cuda")
    plan = choose_plan(device, torch.bfloat16, 1, a.quantize)  # one GPU: graphed decode with the GEMV kernels
    # before: torch's products, compiled by inductor into CUDA graphs; its eager step is the reference
    before = dataclasses.replace(plan, gemv="torch", moe="torch", norms_in_products=False, compile_decode=True,
                                 decode_graphs=False)
    reference = random_model(config, device, torch.bfloat16, a.quantize, before)  # the same weights (seeded)
    model = random_model(config, device, torch.bfloat16, a.quantize, plan)
    for m in (reference, model):
        m.setup_cache(a.prompt + a.steps + 8)
    prompt = torch.randint(0, config.vocab_size, (1, a.prompt), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    eager_tokens, eager_logits, eager_s = run(reference, lambda t, pos: reference(t, pos)[:, -1], prompt,
                                              a.steps)
    print(f"{a.shape} {a.quantize or 'bf16'} layers {config.n_layers}, {a.steps} steps after {a.prompt}; "
          f"reference: torch's eager step, {eager_s * 1e3:.2f} ms/step\n{plan.describe()}", flush=True)
    started = time.perf_counter()
    graphed = DecodeStep(model, compile=False)
    assert graphed._graphed is not None, "the plan does not capture decode in graphs"
    print(compare("graphs", model, graphed, prompt, a.steps, eager_tokens, eager_logits) +
          f"; both runs with captures {time.perf_counter() - started:.1f} s", flush=True)
    if not a.no_compile:
        started = time.perf_counter()
        print(compare("compiled", reference, DecodeStep(reference, compile=True), prompt, a.steps, eager_tokens,
                      eager_logits) + f"; both runs with compile {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
