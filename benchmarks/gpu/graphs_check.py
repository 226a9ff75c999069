"""Decode captured in CUDA graphs (the plan's decode_graphs, decode.GraphedStep; never run on a GPU yet) against the same eager step run
op by op, on random weights of a real shape: greedy tokens and logits, and the time of a step both ways.

    python3 benchmarks/gpu/graphs_check.py [--shape mistral-7b] [--layers N] [--quantize int8] [--steps 32]
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


def greedy(model, step, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor], float]:
    model.slots.reset()
    with torch.no_grad():
        logits = model(prompt, 0)[:, -1]
    tokens, all_logits = [], []
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(steps):
        token = logits.argmax(dim=-1)
        tokens.append(int(token))
        if i == 2:  # the first steps capture graphs: time the rest
            torch.cuda.synchronize()
            started = time.perf_counter()
        logits = step(token.view(1, 1), prompt.shape[1] + i)
        all_logits.append(logits.float())
    torch.cuda.synchronize()
    return tokens, all_logits, (time.perf_counter() - started) / (steps - 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--layers", type=int)
    p.add_argument("--quantize")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    a = p.parse_args()
    config = SHAPES[a.shape]
    if a.layers:
        config = config.with_(n_layers=a.layers)
    device = torch.device("cuda")
    # the candidate plan for one GPU: the --tp kernels (GEMV, experts, norms inside the products), graphed eagerly
    plan = dataclasses.replace(choose_plan(device, torch.bfloat16, 1, a.quantize), decode_graphs=True,
                               gemv="triton", moe="triton", norms_in_products=a.quantize is None)
    model = random_model(config, device, torch.bfloat16, a.quantize, plan)
    model.setup_cache(a.prompt + a.steps + 8)
    prompt = torch.randint(0, config.vocab_size, (1, a.prompt), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    eager_tokens, eager_logits, eager_s = greedy(
        model, lambda t, pos: model(t, pos)[:, -1], prompt, a.steps)
    started = time.perf_counter()
    graphed = DecodeStep(model, compile=False)
    graphs_tokens, graphs_logits, graphs_s = greedy(model, graphed, prompt, a.steps)
    total = time.perf_counter() - started
    diff = max(float((x - y).abs().max()) for x, y in zip(eager_logits, graphs_logits))
    same = sum(x == y for x, y in zip(eager_tokens, graphs_tokens))
    print(f"{a.shape} {a.quantize or 'bf16'} layers {config.n_layers}: graphs {same}/{a.steps} tokens equal to "
          f"eager, largest logit difference {diff:.3g}; step eager {eager_s * 1e3:.2f} ms, graphs "
          f"{graphs_s * 1e3:.2f} ms; graphed run with its captures {total:.2f} s")


if __name__ == "__main__":
    main()
