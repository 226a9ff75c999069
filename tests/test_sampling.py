"""Sampling controls: min-p, repetition and presence penalties, stop strings."""

from __future__ import annotations

import pytest
import torch

from mistral_chat.engine.generate import Session
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.sampling import Penalties, SamplingParams, StopStrings, sample
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(write_tiny_model(tmp_path_factory.mktemp("m"), "mistral")["native"], device="cpu")


def test_min_p_keeps_only_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, min_p=0.35)  # keeps p >= 0.175: tokens 0 and 1
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, params, gen)[0]) for _ in range(300)}
    assert seen == {0, 1}


def test_penalties_lower_seen_tokens():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.5)
    pen = Penalties(params, [1], 4, torch.device("cpu"))
    logits = torch.tensor([[1.0, 2.0, -2.0, 3.0]])
    out = pen.apply(logits)
    assert out.tolist() == [[1.0, 1.0, -2.0, 3.0]]  # prompt token 1 halved
    pen.observe(torch.tensor([2]))
    out = pen.apply(logits)
    assert out.tolist() == [[1.0, 1.0, -4.0 - 1.5, 3.0]]  # answer token 2: multiplied (negative) and presence


def test_stop_strings_cut_and_hold_back():
    stops = StopStrings(["END", "\n\n"])
    pieces = [stops.push(d) for d in ["Hello E", "N", "ough; more", " E", "ND tail"]]
    assert "".join(pieces) == "Hello ENough; more "
    assert stops.stopped
    assert pieces[0] == "Hello "  # "E" held back: it could start "END"


def test_session_stop_string_and_repetition_penalty(loaded):
    ids = loaded.tokenizer.encode("hello there", bos=True)
    session = Session(loaded, context_length=256)
    full = "".join(session.generate(ids, SamplingParams(max_tokens=30)))
    assert len(full) > 6
    stop = full[3:6]
    cut = "".join(session.generate(ids, SamplingParams(max_tokens=30, stop=(stop,))))
    assert cut == full[:full.find(stop)]
    assert session.stats.finish_reason == "stop"
    plain = Session(loaded, context_length=256)
    list(plain.generate(ids, SamplingParams(max_tokens=30)))
    penalised = Session(loaded, context_length=256)
    list(penalised.generate(ids, SamplingParams(max_tokens=30, repetition_penalty=5.0)))
    assert len(set(penalised.generated_ids)) >= len(set(plain.generated_ids))
    assert penalised.generated_ids != plain.generated_ids
