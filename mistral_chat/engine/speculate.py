"""Prompt-lookup speculative decoding: draft the next tokens by finding the answer's last few tokens earlier in the
conversation, check all of them in one forward pass, keep the accepted ones.

A batch-1 decode step costs the time of reading the weights once; a forward pass over a handful of positions costs
about the same. So when the text repeats something the context already holds (code being edited, a quoted
passage, a list restated), `PromptLookup` copies what followed the latest earlier occurrence of the last 3 (else
2, else 1) tokens, and one verify step over [last token, d1..dN] gives N + 1 tokens' logits: the drafts the model
agrees with are kept, plus the model's own token at the first disagreement (or after the last draft), so every
verify yields at least one token.

- Greedy: a draft is accepted while it is the argmax, so the tokens are the ones plain decoding gives.
- Sampling: the draft is a point mass, so the standard rule (Leviathan et al., Chen et al.) becomes: accept d with
  probability p(d) under the processed distribution (temperature, top-k, top-p, min-p); on rejection sample from
  p with d removed. Each token's distribution is then exactly that of plain sampling (not the same draws: a seed
  gives other answers than without speculation).
- Penalties (repetition, presence) change the distribution with every token; Session does not speculate then.

Rejected drafts' cache entries lie past the kept tokens; `SlotPositions.rewind` forgets them. In a rotating
(sliding-window) cache a verify of N + 1 <= max_chunk positions overwrites only slots of positions at least a window
before the first of them, which no later query reads (the buffer holds window + prefill chunk - 1 slots).

`AcceptanceGate` pauses drafting while few drafts are accepted; where nothing matches, a plain decode step runs
(ahead of the host, as Session does without speculation).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from mistral_chat.engine.decode import GraphedStep, key_bucket
from mistral_chat.engine.int4 import Int4Linear
from mistral_chat.engine.model import Transformer
from mistral_chat.engine.options import MAX_SPECULATE
from mistral_chat.engine.quant import Int8Linear
from mistral_chat.engine.sampling import SamplingParams, probabilities, sample
from mistral_chat.engine.stats import GenerationStats

__all__ = ["MAX_SPECULATE", "AcceptanceGate", "Drafter", "PromptLookup", "Speculator", "VerifyStep",
           "accept_drafts", "automatic_drafts", "draw_verified", "quantized", "speculation_off", "verify_graphs"]


class TokenReaderLike(Protocol):
    """generate.TokenReader: copies a sampled token to the host; `waited` counts the seconds spent waiting."""

    waited: float

    def start(self, token: torch.Tensor) -> None: ...

    def value(self) -> int: ...


class Drafter(Protocol):
    """Proposes the tokens that may come next, from the tokens so far."""

    def append(self, token: int) -> None: ...

    def match(self) -> int | None:
        """None where `draft` would propose nothing now."""

    def draft(self, n: int) -> list[int]: ...


class PromptLookup:
    """N-gram lookup over the prompt and the answer so far (as HF transformers' prompt_lookup_num_tokens).

    The last `max_ngram` tokens (then fewer, down to `min_ngram`) are looked up among the earlier n-grams; at the
    latest earlier occurrence, the tokens that followed it are the draft. Where that copy runs into the end of the
    text it goes on with the same offset, so a repeating pattern drafts whole periods. An index of each n-gram's
    latest end keeps a lookup constant-time however long the conversation.
    """

    def __init__(self, tokens: Sequence[int] = (), max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.history: list[int] = list(tokens)
        self._latest_end: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token (not the final one)
        h = self.history
        for n in range(min_ngram, max_ngram + 1):  # in bulk (a long prompt is indexed while its prefill runs)
            grams = zip(*(h[i:len(h) - 1] for i in range(n)))  # those ending at n - 1 .. len(h) - 2
            self._latest_end.update(zip(grams, range(n - 1, len(h) - 1)))  # later ones overwrite: the latest

    def append(self, token: int) -> None:
        end = len(self.history) - 1  # the n-grams ending at the old last token now have a continuation
        for n in range(self.min_ngram, self.max_ngram + 1):
            if end - n + 1 >= 0:
                self._latest_end[tuple(self.history[end - n + 1:end + 1])] = end
        self.history.append(token)

    def match(self) -> int | None:
        """Where the longest matching n-gram last ended before the final token, or None."""
        h = self.history
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(h) > n:
                end = self._latest_end.get(tuple(h[-n:]))
                if end is not None:
                    return end
        return None

    def draft(self, n: int) -> list[int]:
        """Up to `n` tokens that followed the latest match ([] where nothing matches)."""
        end = self.match()
        if end is None:
            return []
        h, out = self.history, []
        for k in range(n):
            src = end + 1 + k
            out.append(h[src] if src < len(h) else out[src - len(h)])
        return out


class AcceptanceGate:
    """Stops drafting while drafts are mostly rejected: when fewer than `threshold` of the last `window` drafted
    tokens were accepted, drafting pauses for `pause` tokens, twice as long at each pause within one answer."""

    def __init__(self, window: int = 32, threshold: float = 0.2, pause: int = 64) -> None:
        self.window = window
        self.threshold = threshold
        self.pause = pause
        self.outcomes: deque[bool] = deque(maxlen=window)
        self.paused_for = 0

    @property
    def open(self) -> bool:
        return self.paused_for == 0

    def tick(self) -> None:
        """One token went by."""
        if self.paused_for:
            self.paused_for -= 1

    def record(self, drafted: int, accepted: int) -> None:
        self.outcomes.extend([True] * accepted + [False] * (drafted - accepted))
        if len(self.outcomes) == self.window and sum(self.outcomes) < self.threshold * self.window:
            self.paused_for = self.pause
            self.pause *= 2
            self.outcomes.clear()


def verify_graphs(model: Transformer) -> bool:
    """Whether verify steps run in CUDA graphs: on one GPU, for dense models. Mixtral's experts take a path with
    data-dependent shapes for more than a few tokens (moe.MoEFeedForward._grouped), which no graph can hold."""
    return model.device.type == "cuda" and not model.parallel.enabled and not model.config.num_experts


# Draft tokens a step where the user did not choose (SamplingParams.speculate None): measured on one H100 with
# Mistral-7B (benchmarks/gpu/speculate.py, docs/engine.md): at most 1% slower when nothing matches (the gate pauses
# drafting), 1.84x / 2.73x / 3.70x faster with 25 / 50 / 75% of the drafts accepted, greedy tokens equal to plain
# decoding's in bf16 (with 8 drafts, a 9-row verify rounded differently and flipped near-ties of random weights).
AUTO_DRAFTS = 4


def automatic_drafts(model: Transformer, params: SamplingParams) -> int:
    """The drafts a step when the user did not choose: AUTO_DRAFTS where verify steps run in CUDA graphs (one GPU,
    a dense model) on float weights and nothing else turns speculation off; 0 elsewhere. On the CPU a verify step
    over N + 1 positions is not measured to cost about one decode step. Nor is it with int8 or int4 weights: their
    kernels take one row, so a verify step converts each weight matrix to the activations' dtype before its product
    (about 5x a decode step's bytes for int8, 8x for int4)."""
    if model.slots is None or not verify_graphs(model) or speculation_off(model, params) is not None:
        return 0
    return 0 if quantized(model) else AUTO_DRAFTS


def quantized(model: Transformer) -> bool:
    """Whether the model's dense layers hold int8 or int4 weights (--quantize, or an AWQ checkpoint)."""
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


def speculation_off(model: Transformer, params: SamplingParams) -> str | None:
    """Why an answer with `params.speculate` > 0 decodes without speculation on this model, or None."""
    if params.penalised:
        return "repetition and presence penalties change the distribution at every token"
    if model.parallel.enabled:
        return "tensor-parallel runs do not speculate"
    if model.device.type == "cuda" and not verify_graphs(model):
        return "Mixtral's verify step cannot run in CUDA graphs yet"
    assert model.slots is not None
    if model.slots.max_chunk < 2:
        return "the cache takes one token per step"
    return None


class VerifyStep:
    """Logits ([T, vocab], float32) of every position of tokens ([1, T]) placed at `position`: on one GPU the eager
    pass captured in CUDA graphs (one per T and cache bucket, `decode.GraphedStep`), else eager."""

    def __init__(self, model: Transformer, graphs: bool | None = None) -> None:
        self.model = model
        self.slots = model.slots  # graphs hold the addresses of this cache: a new cache needs a new VerifyStep
        if graphs is None:
            graphs = verify_graphs(model)
        position = torch.zeros(1, dtype=torch.long, device=model.device)
        self._graphed = GraphedStep(model, position) if graphs else None

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        assert self.model.slots is not None
        if self._graphed is None:
            return self.model(tokens, position, all_logits=True)[0]
        last = position + tokens.shape[1] - 1
        return self._graphed(tokens, position, key_bucket(last, self.model.slots.capacity))[0]


def draw_verified(probs: torch.Tensor, drafts: torch.Tensor,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled acceptance rule, row by row: probs ([T, vocab]) are the processed distributions after the last
    token and each of the T - 1 drafts ([T - 1]). Returns whether each draft is accepted ([T - 1] bool; draft j with
    probability probs[j, d_j]) and the token to take instead ([T]: row j < T - 1 drawn from probs[j] without d_j,
    renormalised; the last row, after every draft, from probs[-1]). Kept tokens are the accepted prefix of the
    drafts, then the replacement at the first rejection."""
    n = drafts.shape[0]
    rows = torch.arange(n, device=probs.device)
    p_draft = probs[rows, drafts]
    accept = torch.rand(n, device=probs.device, generator=generator) < p_draft
    residual = probs.clone()
    residual[rows, drafts] = 0.0
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # p(d) = 1: always accepted, any row will do
    residual = torch.where(empty, probs, residual)
    return accept, torch.multinomial(residual, 1, generator=generator).squeeze(-1)


def accept_drafts(logits: torch.Tensor, drafts: Sequence[int], draft_ids: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None, read: Callable[[torch.Tensor], list[int]]) -> list[int]:
    """The tokens a verify step gives: the accepted drafts, then the model's own token. `logits` [len(drafts) + 1,
    vocab]; `draft_ids` the drafts on the device; `read` copies a small tensor to the host (one wait)."""
    n = len(drafts)
    if params.temperature == 0:
        picks = read(logits.argmax(dim=-1))
        k = 0
        while k < n and picks[k] == drafts[k]:
            k += 1
        return list(drafts[:k]) + [picks[k]]
    accept, replace = draw_verified(probabilities(logits, params), draft_ids, generator)
    values = read(torch.cat([accept.long(), replace]))
    k = 0
    while k < n and values[k]:
        k += 1
    return list(drafts[:k]) + [values[n + k]]


class Speculator:
    """The decode loop's token source with speculation: `first(logits)` gives the answer's first token, then
    `advance(token, remaining)`, after each token the answer keeps (`remaining`: how many more it may take, >= 1),
    writes that token into the cache and gives the next one.

    It appends to `tokens` (the session's list of cached token ids) exactly as plain decoding does. A verify step
    writes the last token and the drafts at once; tokens it accepted are handed out one by one, so the caller's
    end-of-answer rules (EOS, stop strings, max tokens, the context) apply to each as without speculation.
    """

    def __init__(self, model: Transformer, decode: Callable[[torch.Tensor, int], torch.Tensor], verify: VerifyStep,
                 tokens: list[int], params: SamplingParams, generator: torch.Generator | None, n: int,
                 drafter: Drafter, context_length: int, reader: TokenReaderLike, run_ahead: bool,
                 stats: GenerationStats, gate: AcceptanceGate | None = None) -> None:
        self.model = model
        self.decode = decode
        self.verify = verify
        self.tokens = tokens
        self.params = params
        self.generator = generator
        self.n = n
        self.drafter = drafter
        self.context_length = context_length
        self.reader = reader
        self.run_ahead = run_ahead
        self.stats = stats
        self.gate = gate or AcceptanceGate()
        self.device = model.device
        self._queue: list[int] = []  # tokens a verify gave, not yet handed out; all but the last are in the cache
        self._ahead: torch.Tensor | None = None  # logits of a decode step queued before its token was read
        self._sampled: torch.Tensor | None = None  # the last sampled token on the device, while it is the current one

    def first(self, logits: torch.Tensor) -> int:
        return self._next(logits, ahead=False)

    def advance(self, token: int, remaining: int) -> int:
        self.drafter.append(token)
        self.gate.tick()
        if self._queue:  # a verify step wrote `token` already
            self.tokens.append(token)
            return self._queue.pop(0)
        position = len(self.tokens)
        if self._ahead is not None:
            logits, self._ahead = self._ahead, None
        else:
            drafts = self._draft(position, remaining)
            if drafts:
                return self._verify(token, drafts, position)
            on_device = self._sampled if self._sampled is not None else torch.tensor([token], device=self.device)
            logits = self.decode(on_device.view(1, 1), position)
        self.tokens.append(token)
        return self._next(logits, ahead=remaining > 1 and len(self.tokens) + 1 < self.context_length)

    def _draft(self, position: int, remaining: int) -> list[int]:
        # the verify writes positions position .. position + n, all inside the context
        n = min(self.n, self.context_length - 1 - position)
        if remaining < 2 or n < 1 or not self.gate.open:
            return []
        return self.drafter.draft(n)

    def _next(self, logits: torch.Tensor, ahead: bool) -> int:
        """Sample the token after the cached ones; queue its decode step before reading it where no draft is
        expected (a draft needs the token on the host first)."""
        token = sample(logits, self.params, self.generator)
        self._sampled = token
        self.reader.start(token)
        if ahead and self.run_ahead and not self._expect_draft():
            self._ahead = self.decode(token.view(1, 1), len(self.tokens))
        return self.reader.value()

    def _expect_draft(self) -> bool:
        """Whether the next step will likely draft: the gate is open and the text so far has a match (the token
        being read may change that; a wrong guess costs one step's run-ahead, or one plain step's draft)."""
        return self.gate.open and self.drafter.match() is not None

    def _verify(self, token: int, drafts: list[int], position: int) -> int:
        ids = torch.tensor([[token, *drafts]], device=self.device)
        logits = self.verify(ids, position)
        kept = accept_drafts(logits, drafts, ids[0, 1:], self.params, self.generator, self._read)
        accepted = len(kept) - 1
        self.stats.drafted_tokens += len(drafts)
        self.stats.accepted_tokens += accepted
        self.gate.record(len(drafts), accepted)
        self.tokens.append(token)
        if accepted < len(drafts):
            assert self.model.slots is not None
            self.model.slots.rewind(position + 1 + accepted)  # forget the rejected drafts' keys
        self._queue, self._sampled = kept, None
        return self._queue.pop(0)

    def _read(self, values: torch.Tensor) -> list[int]:
        started = time.perf_counter()
        out = values.tolist()
        self.reader.waited += time.perf_counter() - started
        return out
