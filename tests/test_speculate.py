"""Prompt-lookup speculative decoding (engine/speculate.py, `SamplingParams.speculate`).

Greedy answers must be token for token those of plain decoding: on a Mistral whose sliding window is shorter than
the answer (the rotating cache wraps), on a Mixtral, on a model whose head size is not dim / heads; with drafts
found by prompt lookup and with drafts known to be right (the plain answer, partly corrupted), so that both the
accepted and the rejected paths run; and with the answer ending (EOS, stop string, max tokens, the context) in
the middle of a verify step's tokens. The sampled acceptance rule is checked against the distribution it must
reproduce, the drafter's n-gram matching and the acceptance gate on their own.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mistral_chat.engine import generate as generate_module
from mistral_chat.engine import speculate as speculate_module
from mistral_chat.engine.generate import Session
from mistral_chat.engine.loader import LoadedModel, load_model
from mistral_chat.engine.sampling import SamplingParams, probabilities
from mistral_chat.engine.speculate import (AUTO_DRAFTS, AcceptanceGate, PromptLookup, VerifyStep, accept_drafts,
                                          draw_verified)
from tiny_models import write_tiny_model

CONTEXT = 256
CHUNK = 32  # the tiny Mistral's window is 16: the cache holds 47 slots, which a 24 + 60-token conversation wraps
ANSWER = 60


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("speculate")
    out = {}
    for kind in ("mistral", "mixtral", "nemo"):
        out[kind] = load_model(write_tiny_model(root / kind, kind)["native"], device="cpu", dtype="float32")
    return out


@pytest.fixture(params=[False, True], ids=["step-by-step", "run-ahead"])
def run_ahead(request, monkeypatch) -> bool:
    """Plain steps queued after the host read each token (the CPU's way) or before (the GPU's)."""
    init = Session.__init__

    def with_run_ahead(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.run_ahead = request.param

    monkeypatch.setattr(Session, "__init__", with_run_ahead)
    return request.param


class Oracle:
    """Drafts the plain answer's next tokens, every `wrong_every`-th drafted token changed: drafts the model accepts,
    and rejections at known places (a model-free acceptance check, as benchmarks/gpu/speculate.py)."""

    def __init__(self, prompt, truth: list[int], wrong_every: int = 3) -> None:
        self.history = list(prompt)
        self.start = len(self.history)
        self.truth = truth
        self.wrong_every = wrong_every
        self.count = 0

    def append(self, token: int) -> None:
        self.history.append(token)

    def match(self) -> int:
        return 0

    def draft(self, n: int) -> list[int]:
        done = len(self.history) - self.start
        out = list(self.truth[done:done + n])
        for k in range(len(out)):
            self.count += 1
            if self.count % self.wrong_every == 0:
                out[k] = (out[k] + 1) % 1000
        return out


def use_oracle(monkeypatch, truth: list[int], wrong_every: int = 3) -> None:
    monkeypatch.setattr(generate_module, "PromptLookup", lambda prompt: Oracle(prompt, truth, wrong_every))


def run(loaded: LoadedModel, prompt: list[int], params: SamplingParams, **session_args) -> tuple[Session, str]:
    session = Session(loaded, **{"context_length": CONTEXT, "prefill_chunk": CHUNK, **session_args})
    text = "".join(session.generate(prompt, params))
    return session, text


def prompt_of(n: int = 24) -> list[int]:
    return [1] + [(37 * i + 11) % 900 + 20 for i in range(n)]


@pytest.mark.parametrize("kind", ["mistral", "mixtral", "nemo"])
def test_greedy_equals_plain_decoding(models, kind, run_ahead, monkeypatch):
    loaded = models[kind]
    prompt = prompt_of()
    plain, plain_text = run(loaded, prompt, SamplingParams(max_tokens=ANSWER))
    assert plain.stats.generated_tokens == ANSWER
    for n in (1, 4, 8):
        spec, text = run(loaded, prompt, SamplingParams(max_tokens=ANSWER, speculate=n))
        assert spec.generated_ids == plain.generated_ids, n
        assert text == plain_text
        assert spec.tokens == plain.tokens
    use_oracle(monkeypatch, plain.generated_ids)
    for n in (1, 4, 8):
        spec, text = run(loaded, prompt, SamplingParams(max_tokens=ANSWER, speculate=n))
        assert spec.generated_ids == plain.generated_ids, n
        assert spec.tokens == plain.tokens
        assert 0 < spec.stats.accepted_tokens < spec.stats.drafted_tokens


def test_cache_after_a_speculative_answer_serves_the_next_turn(models, monkeypatch):
    """A follow-up turn reuses the cache a speculative answer left (rejected drafts rolled back)."""
    loaded = models["mistral"]
    prompt = prompt_of()
    plain, _ = run(loaded, prompt, SamplingParams(max_tokens=40))
    use_oracle(monkeypatch, plain.generated_ids, wrong_every=2)
    spec, _ = run(loaded, prompt, SamplingParams(max_tokens=40, speculate=8))
    assert spec.generated_ids == plain.generated_ids and spec.stats.drafted_tokens > spec.stats.accepted_tokens
    follow = prompt + plain.generated_ids + [40, 50, 60]
    params = SamplingParams(max_tokens=30)
    again = "".join(spec.generate(follow, params))
    assert spec.stats.prefilled_tokens < len(follow)  # the cache was reused
    fresh, fresh_text = run(loaded, follow, params)
    assert spec.generated_ids == fresh.generated_ids and again == fresh_text


def copying_model(loaded: LoadedModel, cycle: list[int]) -> LoadedModel:
    """A copy of `loaded` whose greedy answer repeats `cycle` (each token's successor written into the output
    layer; attention and feed-forward outputs scaled down but still there)."""
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.mul_(0.2)
            layer.feed_forward.w2.weight.mul_(0.2)
        emb = model.tok_embeddings.weight
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            model.output.weight[b] = 4 * emb[a] / emb[a].norm() * emb.shape[1] ** 0.5
    return dataclasses.replace(loaded, model=model)


def test_prompt_lookup_drafts_are_accepted_on_repeated_text(models, run_ahead):
    cycle = [100, 2000, 300, 4000, 500, 6000, 700]
    loaded = copying_model(models["mistral"], cycle)
    prompt = [1] + [cycle[i % len(cycle)] for i in range(3, 30)]
    plain, _ = run(loaded, prompt, SamplingParams(max_tokens=60))
    assert plain.generated_ids[:7] == cycle[2:] + cycle[:2]  # the model copies
    for n in (1, 4, 8):
        spec, _ = run(loaded, prompt, SamplingParams(max_tokens=60, speculate=n))
        assert spec.generated_ids == plain.generated_ids
        assert spec.stats.accepted_tokens >= 0.8 * spec.stats.drafted_tokens > 0
        assert spec.stats.acceptance >= 0.8


def test_speculation_is_automatic_where_verify_steps_run_in_graphs(models, monkeypatch):
    """speculate None (the default): off on the CPU; AUTO_DRAFTS where verify steps run in CUDA graphs (one GPU,
    dense: faked here, the steps running eagerly), unless penalties or an explicit 0 turn it off."""
    cycle = [100, 2000, 300, 4000, 500, 6000, 700]
    loaded = copying_model(models["mistral"], cycle)
    prompt = [1] + [cycle[i % len(cycle)] for i in range(3, 30)]
    default, _ = run(loaded, prompt, SamplingParams(max_tokens=40))
    assert SamplingParams().speculate is None and default.stats.drafted_tokens == 0
    monkeypatch.setattr(speculate_module, "verify_graphs", lambda model: True)
    monkeypatch.setattr(generate_module, "VerifyStep", lambda model: VerifyStep(model, graphs=False))
    auto, _ = run(loaded, prompt, SamplingParams(max_tokens=40))
    assert auto.generated_ids == default.generated_ids
    assert auto.stats.drafted_tokens >= AUTO_DRAFTS and auto.stats.accepted_tokens > 0
    for params in (SamplingParams(max_tokens=40, speculate=0), SamplingParams(max_tokens=40, presence_penalty=0.5)):
        off, _ = run(loaded, prompt, params)
        assert off.stats.drafted_tokens == 0


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_speculation_is_not_automatic_on_quantized_weights(models, monkeypatch, quantize):
    """With int8 or int4 weights a verify step converts whole weight matrices (their kernels take one row), so the
    default is off there; an explicit --speculate N still drafts."""
    from tiny_models import random_model

    monkeypatch.setattr(speculate_module, "verify_graphs", lambda model: True)
    config = models["mistral"].config
    for weights, drafts in ((None, AUTO_DRAFTS), (quantize, 0)):
        model = random_model(config, quantize=weights)
        model.setup_cache(CONTEXT)
        assert speculate_module.quantized(model) == (weights is not None)
        assert speculate_module.automatic_drafts(model, SamplingParams()) == drafts
        assert speculate_module.speculation_off(model, SamplingParams(speculate=4)) is None  # an explicit N drafts


def test_answer_ends_inside_a_verify_step(models, monkeypatch):
    """EOS, a stop string, max tokens and the context limit end the answer where plain decoding ends it, though
    a verify step gave tokens past that point."""
    loaded = models["mistral"]
    prompt = prompt_of()
    truth, _ = run(loaded, prompt, SamplingParams(max_tokens=40))
    ids = truth.generated_ids
    use_oracle(monkeypatch, ids, wrong_every=1000)  # every draft right: verify steps of 9 tokens

    for max_tokens in (1, 2, 7, 13):
        plain, plain_text = run(loaded, prompt, SamplingParams(max_tokens=max_tokens))
        spec, text = run(loaded, prompt, SamplingParams(max_tokens=max_tokens, speculate=8))
        assert (spec.generated_ids, text, spec.tokens) == (plain.generated_ids, plain_text, plain.tokens)
        assert spec.stats.finish_reason == plain.stats.finish_reason == "length"

    eos_loaded = dataclasses.replace(loaded, tokenizer=copy.copy(loaded.tokenizer))
    eos_loaded.tokenizer.eos_id = ids[11]
    first = ids.index(ids[11])
    plain, plain_text = run(eos_loaded, prompt, SamplingParams(max_tokens=40))
    spec, text = run(eos_loaded, prompt, SamplingParams(max_tokens=40, speculate=8))
    assert plain.generated_ids == ids[:first] and plain.stats.finish_reason == "stop"
    assert (spec.generated_ids, text, spec.tokens) == (plain.generated_ids, plain_text, plain.tokens)
    assert spec.stats.finish_reason == "stop" and spec.stats.accepted_tokens > 0

    full = loaded.tokenizer.decode(ids)
    stop = full[len(loaded.tokenizer.decode(ids[:10])):][:3]
    assert stop.strip()
    params = SamplingParams(max_tokens=40, stop=(stop,))
    plain, plain_text = run(loaded, prompt, params)
    spec, text = run(loaded, prompt, dataclasses.replace(params, speculate=8))
    assert plain.stats.finish_reason == "stop" and len(plain.generated_ids) < 40
    assert (spec.generated_ids, text, spec.tokens) == (plain.generated_ids, plain_text, plain.tokens)
    assert spec.stats.finish_reason == "stop"

    for context in (len(prompt) + 3, len(prompt) + 12):  # the context ends the answer; verify steps stay inside it
        plain, plain_text = run(loaded, prompt, SamplingParams(max_tokens=40), context_length=context)
        spec, text = run(loaded, prompt, SamplingParams(max_tokens=40, speculate=8), context_length=context)
        assert (spec.generated_ids, text, spec.tokens) == (plain.generated_ids, plain_text, plain.tokens)
        assert len(spec.tokens) < context and spec.stats.finish_reason == "length"


def test_draft_length_is_capped_by_the_cache_chunk(models, monkeypatch):
    """A verify step writes at most max_chunk positions (here a prefill chunk of 4: 3 drafts)."""
    loaded = models["mistral"]
    prompt = prompt_of()
    plain, _ = run(loaded, prompt, SamplingParams(max_tokens=30), prefill_chunk=4)
    use_oracle(monkeypatch, plain.generated_ids, wrong_every=1000)
    spec, _ = run(loaded, prompt, SamplingParams(max_tokens=30, speculate=16), prefill_chunk=4)
    assert spec.generated_ids == plain.generated_ids
    assert spec.stats.drafted_tokens > 0 and spec.stats.drafted_tokens % 3 == 0


def test_penalties_turn_speculation_off(models, monkeypatch):
    loaded = models["mistral"]
    prompt = prompt_of()
    params = SamplingParams(max_tokens=20, repetition_penalty=1.3)
    plain, _ = run(loaded, prompt, params)
    use_oracle(monkeypatch, plain.generated_ids)
    spec, _ = run(loaded, prompt, dataclasses.replace(params, speculate=4))
    assert spec.generated_ids == plain.generated_ids and spec.stats.drafted_tokens == 0


def test_sampling_with_speculation_is_seeded(models, monkeypatch):
    loaded = models["mistral"]
    prompt = prompt_of()
    params = SamplingParams(max_tokens=40, temperature=0.8, top_k=50, seed=3, speculate=4)
    greedy, _ = run(loaded, prompt, SamplingParams(max_tokens=40))
    use_oracle(monkeypatch, greedy.generated_ids)
    first, text = run(loaded, prompt, params)
    second, text_again = run(loaded, prompt, params)
    assert first.generated_ids == second.generated_ids and text == text_again
    assert first.stats.generated_tokens == 40 and first.stats.drafted_tokens > 0


# ---- the sampled acceptance rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("params, draft", [
    (SamplingParams(temperature=1.0), 1),  # a likely draft
    (SamplingParams(temperature=0.7), 4),  # an unlikely one
    (SamplingParams(temperature=1.3, top_k=3), 3),  # one top-k removes: never accepted
    (SamplingParams(temperature=1.0, top_p=0.6), 0),  # top-p leaves only the draft: always accepted
])
def test_sampled_acceptance_keeps_the_distribution(params, draft):
    """Each row of a verify step must give token x with probability p(x): accepted draft, or the replacement."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -0.5, -1.0]])
    p = probabilities(logits, params)[0]
    rows = 200_000
    probs = p.expand(rows + 1, -1).contiguous()
    drafts = torch.full((rows,), draft)
    accept, replace = draw_verified(probs, drafts, torch.Generator().manual_seed(0))
    out = torch.where(accept, drafts, replace[:-1])
    freq = torch.bincount(out, minlength=5).double() / rows
    # binomial standard deviation <= 0.0012 at 200k draws: 0.01 is 8 of them
    assert torch.allclose(freq, p.double(), atol=0.01), (freq, p)
    assert float(accept.double().mean()) == pytest.approx(float(p[draft]), abs=0.01)


def test_accept_drafts_keeps_the_agreed_prefix():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 7, 2, 9]):
        logits[row, best] = 5.0
    greedy = SamplingParams()
    read = lambda t: t.tolist()  # noqa: E731
    assert accept_drafts(logits, [3, 7, 2], torch.tensor([3, 7, 2]), greedy, None, read) == [3, 7, 2, 9]
    assert accept_drafts(logits, [3, 8, 2], torch.tensor([3, 8, 2]), greedy, None, read) == [3, 7]
    assert accept_drafts(logits, [4, 7, 2], torch.tensor([4, 7, 2]), greedy, None, read) == [3]
    # sampling from near point masses: the same choices
    sampled = SamplingParams(temperature=0.1)
    gen = torch.Generator().manual_seed(0)
    assert accept_drafts(logits, [3, 8, 2], torch.tensor([3, 8, 2]), sampled, gen, read) == [3, 7]


# ---- drafting --------------------------------------------------------------------------------------------------


def test_prompt_lookup_prefers_long_and_recent_matches():
    text = [1, 2, 3, 4, 9, 9, 2, 3, 5, 6, 7, 8, 2, 3]
    drafter = PromptLookup(text)
    # the last 3 tokens (8, 2, 3) never came before; (2, 3) did, last at index 6-7: then 5, 6, 7
    assert drafter.draft(3) == [5, 6, 7]
    drafter.append(4)  # (2, 3, 4) matches the start: 9, 9, 2
    assert drafter.draft(3) == [9, 9, 2]
    assert PromptLookup([5, 6, 7]).draft(4) == []  # nothing repeats
    assert PromptLookup([5]).draft(4) == []
    assert PromptLookup([]).draft(4) == []
    lone = PromptLookup([10, 11, 12, 11])  # a single token: what followed it last
    assert lone.draft(2) == [12, 11]


def test_prompt_lookup_continues_a_repeating_pattern():
    assert PromptLookup([7, 7, 7]).draft(5) == [7, 7, 7, 7, 7]
    assert PromptLookup([1, 2, 3, 1, 2, 3, 1]).draft(7) == [2, 3, 1, 2, 3, 1, 2]
    drafter = PromptLookup([4, 5])
    for token in (4, 5):
        drafter.append(token)
    assert drafter.draft(3) == [4, 5, 4]


def test_prompt_lookup_index_matches_a_plain_search():
    """The incremental index gives the draft a plain backwards search over the whole text gives."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, 6, (400,), generator=gen).tolist()
    drafter = PromptLookup()

    def search(h: list[int], n: int) -> list[int]:
        for size in (3, 2, 1):
            if len(h) <= size:
                continue
            for end in range(len(h) - 2, size - 2, -1):
                if h[end - size + 1:end + 1] == h[-size:]:
                    seq = list(h)
                    for k in range(n):
                        seq.append(seq[end + 1 + k])
                    return seq[len(h):]
        return []

    for i, token in enumerate(text):
        drafter.append(token)
        assert drafter.draft(4) == search(text[:i + 1], 4), i


def test_acceptance_gate_pauses_and_backs_off():
    gate = AcceptanceGate(window=8, threshold=0.25, pause=4)
    gate.record(4, 1)
    assert gate.open  # fewer than 8 drafted yet
    gate.record(4, 0)  # 1 of 8 accepted
    assert not gate.open
    for _ in range(4):
        gate.tick()
    assert gate.open
    gate.record(8, 2)  # 2 of 8: at the threshold, drafting goes on
    assert gate.open
    gate.record(8, 1)  # window now holds 1 of 8
    assert not gate.open and gate.paused_for == 8  # the pause doubled


def test_a_session_that_gets_a_new_cache_gets_a_new_verify_step(models, monkeypatch):
    """Another session on the same model took the cache: this one's next answer allocates a new one, and its verify
    step (whose CUDA graphs hold the old cache's addresses) is made again."""
    loaded = models["nemo"]
    prompt = prompt_of()
    params = SamplingParams(max_tokens=12, speculate=4)
    plain, _ = run(loaded, prompt, SamplingParams(max_tokens=12))
    use_oracle(monkeypatch, plain.generated_ids)
    first, _ = run(loaded, prompt, params)
    first_verify = first._verify
    other, _ = run(loaded, prompt, params)
    assert other._verify is not first_verify
    "".join(first.generate(prompt, params))
    assert first._verify is not first_verify and first._verify.slots is loaded.model.slots
    assert first.generated_ids == plain.generated_ids
