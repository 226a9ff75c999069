"""Choosing the next token from logits (greedy, temperature, top-k, top-p, min-p, penalties, seeded) and
spotting stop strings in the streamed text."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mistral_chat.engine.options import SamplingParams

__all__ = ["Penalties", "SamplingParams", "StopStrings", "make_generator", "probabilities", "sample"]


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids ([B]) from float32 logits ([B, vocab]); stays on the logits' device (no host sync)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(_weights(logits, params), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from (temperature > 0), rows summing to 1 ([B, vocab])."""
    weights = _weights(logits, params)
    return weights / weights.sum(dim=-1, keepdim=True)


def _weights(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, min-p, top-k, then top-p: the weights `sample` draws from (after top-p not summing to 1)."""
    logits = logits / params.temperature
    if params.min_p > 0:
        logits = logits.masked_fill(torch.softmax(logits, dim=-1) < params.min_p * torch.softmax(
            logits, dim=-1).amax(dim=-1, keepdim=True), float("-inf"))
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


class Penalties:
    """Repetition penalty over the prompt and answer, presence penalty over the answer (as vLLM does), kept as
    masks on the device so that sampling needs no host round trip."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int], vocab_size: int, device: torch.device) -> None:
        self.params = params
        self.in_context = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.in_answer = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt:
            self.in_context[torch.tensor(list(prompt), device=device)] = True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.repetition_penalty != 1.0:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.in_context, penalised, logits)
        if p.presence_penalty != 0.0:
            logits = logits - p.presence_penalty * self.in_answer.to(logits.dtype)
        return logits

    def observe(self, token: torch.Tensor) -> None:
        self.in_context[token] = True
        self.in_answer[token] = True


class StopStrings:
    """Holds back streamed text that could be the start of a stop string; cuts the answer at the first one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """The text that is safe to show now."""
        if not self.stops:
            return delta
        self.pending += delta
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
