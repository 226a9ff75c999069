"""Greedy tokens of compiled decode on random weights of a real shape, for comparing two checkouts of the engine on
one GPU (benchmarks/gpu/before_after.sh): prints the token ids and the last logits' sum as one JSON line.

    python3 benchmarks/gpu/greedy_tokens.py [--shape mistral-7b] [--quantize int8] [--steps 32] [--prompt 512]

Written against both the current engine and the one before the redesign (random_model and SHAPES moved)."""

from __future__ import annotations

import argparse
import json

import torch

try:
    from mistral_chat.bench.shapes import SHAPES
    from mistral_chat.engine.loader import random_model
except ImportError:  # the engine before the redesign
    from mistral_chat.bench import SHAPES, random_model  # type: ignore[no-redef]
from mistral_chat.engine.decode import DecodeStep


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
    model = random_model(config, device, torch.bfloat16, a.quantize)
    model.setup_cache(a.prompt + a.steps + 8)
    prompt = torch.randint(0, config.vocab_size, (1, a.prompt), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    with torch.no_grad():
        logits = model(prompt, 0)[:, -1]
    step = DecodeStep(model, compile=True)
    tokens, margins, sums = [], [], [float(logits.double().sum())]
    for i in range(a.steps):
        top = logits.float().topk(2, dim=-1).values[0]
        margins.append(round(float(top[0] - top[1]), 5))  # a near-tie here may go either way
        token = logits.argmax(dim=-1)
        tokens.append(int(token))
        logits = step(token.view(1, 1), a.prompt + i)
        sums.append(float(logits.double().sum()))
    print(json.dumps({"tokens": tokens, "margins": margins, "logits_sums": sums,
                      "last_logits_sum": sums[-1]}))


if __name__ == "__main__":
    main()
