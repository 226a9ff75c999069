"""`Session`: answers streamed from a KV cache that lives across the turns of a conversation.

A follow-up turn, an edited history and a conversation longer than the sliding window must all give the answer a
fresh session gives for the same conversation; greedy answers equal HF transformers'; streamed text equals the
tokenizer's decoding of the generated ids; sampling is reproducible by seed; cancel, max tokens and the context
limit end generation as documented.
"""

from __future__ import annotations

import threading

import pytest
import torch

from mistral_chat.chat.templates import ChatMessage, encode_conversation
from mistral_chat.engine.generate import Session
from mistral_chat.engine.loader import LoadedModel, load_model
from mistral_chat.engine.sampling import SamplingParams
from mistral_chat.errors import ContextLengthError, DeviceError
from tiny_models import write_tiny_model

GREEDY = SamplingParams(max_tokens=10)
WINDOW = 16  # the tiny mistral's sliding window
WRAPPING_CHUNK = 32  # with it the cache holds WINDOW + 31 = 47 slots, and a 256-token context wraps it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("session")
    return {
        "mistral": write_tiny_model(root / "mistral", "mistral"),
        # tekken's byte-level pieces often end inside a UTF-8 character: the hard case for streaming
        "tekken": write_tiny_model(root / "tekken", "mistral", tokenizer="tekken", dim=32, hidden_dim=64,
                                   n_layers=1),
    }


@pytest.fixture(scope="module")
def loaded(tiny) -> LoadedModel:
    return load_model(tiny["mistral"]["native"], device="cpu", dtype="float32")


@pytest.fixture(autouse=True, params=[False, True], ids=["step-by-step", "run-ahead"])
def run_ahead(request, monkeypatch) -> bool:
    """Every test twice: decode steps queued after the host read each token (the CPU's way), and queued before
    it (`Session.run_ahead`, the GPU's way), which must not change a single token or cache entry that counts."""
    init = Session.__init__

    def with_run_ahead(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.run_ahead = request.param

    monkeypatch.setattr(Session, "__init__", with_run_ahead)
    return request.param


def user(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def answer(session: Session, ids: list[int], params: SamplingParams = GREEDY) -> str:
    return "".join(session.generate(ids, params))


def fresh_answer(loaded: LoadedModel, ids: list[int], params: SamplingParams = GREEDY, **session_args) -> str:
    """The answer of a new session (its cache empty), for comparison. Leaves the model to that session."""
    session = Session(loaded, **session_args)
    text = answer(session, ids, params)
    assert session.stats.prefilled_tokens == len(ids)
    return text


def hf_greedy_ids(model_dir, ids: list[int], steps: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=steps, do_sample=False, attention_mask=torch.ones_like(x))
    return out[0, len(ids):].tolist()


# ---- the cache across turns -----------------------------------------------------------------------------------


def two_turns(loaded: LoadedModel, session: Session, first_answer: int = 10
              ) -> tuple[list[ChatMessage], list[int], str]:
    """Answer a first message in `session`, then a follow-up; return the follow-up's conversation, ids, answer."""
    tok = loaded.tokenizer
    first = [user("Tell me a story about a lighthouse keeper and her cat.")]
    reply = answer(session, encode_conversation(tok, first), SamplingParams(max_tokens=first_answer))
    conversation = first + [ChatMessage("assistant", reply), user("What happened next?")]
    ids = encode_conversation(tok, conversation)
    return conversation, ids, answer(session, ids)


def test_follow_up_prefills_only_new_tokens_and_equals_a_fresh_session(loaded):
    session = Session(loaded, context_length=256)
    assert not session.model.slots.wraps
    _, ids, followed = two_turns(loaded, session)
    stats = session.stats
    assert stats.prompt_tokens == len(ids)
    # the first turn stays cached; the answer's text may tokenize differently from the ids generated
    assert len(encode_conversation(loaded.tokenizer, [user("x")])) < stats.prefilled_tokens < stats.prompt_tokens
    assert followed == fresh_answer(loaded, ids, context_length=256)


def wrapping_session(loaded: LoadedModel) -> Session:
    session = Session(loaded, context_length=256, prefill_chunk=WRAPPING_CHUNK)
    assert session.model.slots.wraps and session.model.slots.capacity == WINDOW + WRAPPING_CHUNK - 1
    return session


def test_follow_up_after_the_rotating_cache_wrapped(loaded):
    """The conversation runs past the buffer's 47 slots; positions before the last 47 are overwritten."""
    session = wrapping_session(loaded)
    _, ids, followed = two_turns(loaded, session, first_answer=40)
    assert len(ids) > session.model.slots.capacity
    # either the cache still held the window before the first new token, or the session ran everything again
    assert session.stats.prefilled_tokens <= session.stats.prompt_tokens
    assert followed == fresh_answer(loaded, ids, context_length=256, prefill_chunk=WRAPPING_CHUNK)


@pytest.mark.parametrize("wrapped", [False, True])
def test_editing_an_early_message_invalidates_the_cache(loaded, wrapped):
    chunk = WRAPPING_CHUNK if wrapped else 2048
    session = Session(loaded, context_length=256, prefill_chunk=chunk)
    conversation, ids, _ = two_turns(loaded, session, first_answer=40)
    assert session.model.slots.wraps == wrapped and (len(session.tokens) > session.model.slots.capacity) == wrapped
    edited = [user("Tell me a story about a lighthouse keeper and her dog.")] + conversation[1:]
    edited_ids = encode_conversation(loaded.tokenizer, edited)
    shared = next(i for i, (a, b) in enumerate(zip(ids, edited_ids)) if a != b)
    got = answer(session, edited_ids)
    if wrapped:  # the keys before the edit were overwritten long ago: everything runs again
        assert session.stats.prefilled_tokens == len(edited_ids)
    else:  # the cache is cut back to the shared prefix
        assert session.stats.prefilled_tokens == len(edited_ids) - shared
    assert got == fresh_answer(loaded, edited_ids, context_length=256, prefill_chunk=chunk)


def test_editing_the_last_message_rewinds_a_wrapped_cache(loaded):
    """An edit within the window of a wrapped buffer: the cache is cut back, not thrown away."""
    session = wrapping_session(loaded)
    conversation, ids, _ = two_turns(loaded, session, first_answer=40)
    assert len(session.tokens) > session.model.slots.capacity
    edited = conversation[:-1] + [user("What happened after that?")]
    edited_ids = encode_conversation(loaded.tokenizer, edited)
    shared = next(i for i, (a, b) in enumerate(zip(ids, edited_ids)) if a != b)
    # the window before the edit is still in the buffer
    assert len(session.tokens) - shared + WINDOW - 1 <= session.model.slots.capacity
    got = answer(session, edited_ids)
    assert session.stats.prefilled_tokens == len(edited_ids) - shared
    assert got == fresh_answer(loaded, edited_ids, context_length=256, prefill_chunk=WRAPPING_CHUNK)


def test_greedy_answer_equals_transformers(tiny, loaded):
    ids = encode_conversation(loaded.tokenizer, [user("Name three colours.")])
    expected = hf_greedy_ids(tiny["mistral"]["hf"], ids, GREEDY.max_tokens)
    got = answer(Session(loaded, context_length=128), ids)
    assert got == loaded.tokenizer.decode(expected)


def test_streamed_text_equals_decoding_the_ids(tiny):
    """Tekken: random byte-level tokens split characters; the deltas must still join to decode(ids)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    model = load_model(tiny["tekken"]["native"], device="cpu", dtype="float32")
    ids = encode_conversation(model.tokenizer, [user("Écris un poème 🌊")])
    steps = 40
    expected_ids = hf_greedy_ids(tiny["tekken"]["hf"], ids, steps)
    session = Session(model, context_length=128)
    deltas = list(session.generate(ids, SamplingParams(max_tokens=steps)))
    reference = MistralTokenizer.from_file(str(tiny["tekken"]["native"] / "tekken.json"))
    assert len(deltas) > 1
    assert "".join(deltas) == model.tokenizer.decode(expected_ids) == reference.decode(expected_ids)
    assert session.stats.generated_tokens == len([t for t in expected_ids if t != model.tokenizer.eos_id])


# ---- stopping --------------------------------------------------------------------------------------------------


def test_cancel_from_another_thread(loaded):
    session = Session(loaded, context_length=256)
    ids = encode_conversation(loaded.tokenizer, [user("Count to a thousand.")])
    cancel = threading.Event()
    reached = threading.Event()
    canceller = threading.Thread(target=lambda: reached.wait(30) and cancel.set())
    canceller.start()
    pieces = []
    for delta in session.generate(ids, SamplingParams(max_tokens=200), cancel=cancel):
        pieces.append(delta)
        if len(pieces) == 3:
            reached.set()
            canceller.join(30)  # the other thread has set the event before the next token
    assert session.stats.finish_reason == "cancelled"
    assert 3 <= session.stats.generated_tokens < 200
    # the session is still usable, and reuses what it fed
    follow = answer(session, ids)
    assert session.stats.prefilled_tokens == 1
    assert follow == fresh_answer(loaded, ids, context_length=256)


@pytest.mark.parametrize("ending", ["eos", "stop string"])
def test_an_answer_that_ends_early_leaves_the_cache_right_for_the_next_turn(loaded, monkeypatch, ending):
    """Run ahead, the step for the token that ends the answer has already written that token's keys at the
    next position; the follow-up turn must still equal a fresh session's answer."""
    ids = encode_conversation(loaded.tokenizer, [user("Tell me a story.")])
    session = Session(loaded, context_length=256)
    greedy = "".join(session.generate(ids, SamplingParams(max_tokens=12)))
    ending_id = session.generated_ids[4]
    session.reset()
    if ending == "eos":
        monkeypatch.setattr(loaded.tokenizer, "eos_id", ending_id)
        params = SamplingParams(max_tokens=12)
    else:
        params = SamplingParams(max_tokens=12, stop=[loaded.tokenizer.decode(session.generated_ids[3:5])])
    text = "".join(session.generate(ids, params))
    assert session.stats.finish_reason == "stop" and len(text) < len(greedy)
    follow_up = ids + session.generated_ids[:4] + encode_conversation(loaded.tokenizer, [user("Go on.")])[1:]
    again = answer(session, follow_up)
    assert session.stats.prefilled_tokens < len(follow_up)  # the cache was reused
    assert again == fresh_answer(loaded, follow_up, context_length=256)


def test_max_tokens_ends_with_length(loaded):
    session = Session(loaded, context_length=256)
    ids = encode_conversation(loaded.tokenizer, [user("Hello")])
    answer(session, ids, SamplingParams(max_tokens=4))
    assert session.stats.finish_reason == "length"
    assert session.stats.generated_tokens == 4


def test_prompt_as_long_as_the_context_is_refused(loaded):
    session = Session(loaded, context_length=32)
    ids = encode_conversation(loaded.tokenizer, [user("word " * 40)])
    assert len(ids) >= 32
    with pytest.raises(ContextLengthError, match="32"):
        answer(session, ids)
    with pytest.raises(ContextLengthError):
        answer(session, ids[:32])  # exactly the context: no room for an answer
    answer(session, ids[:31], SamplingParams(max_tokens=5))  # one slot left: one token, then the context is full
    assert session.stats.generated_tokens == 1 and session.stats.finish_reason == "length"


def test_out_of_memory_while_generating_is_a_device_error(loaded):
    """The cancel event is polled before every token: one that fails as an allocation would stands in for it."""

    class FailingEvent(threading.Event):
        def is_set(self) -> bool:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 1099511627776 bytes.")

    session = Session(loaded, context_length=256)
    ids = encode_conversation(loaded.tokenizer, [user("Hello")])
    with pytest.raises(DeviceError, match="out of memory on cpu while generating"):
        list(session.generate(ids, SamplingParams(max_tokens=4), cancel=FailingEvent()))
    assert session.tokens == []  # the cache was dropped


# ---- sampling ---------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(loaded):
    session = Session(loaded, context_length=256)
    ids = encode_conversation(loaded.tokenizer, [user("Surprise me.")])

    def sampled(seed: int) -> str:
        return answer(session, ids, SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=16, seed=seed))

    first = sampled(1234)
    assert sampled(1234) == first
    assert sampled(4321) != first
    assert first != answer(session, ids, SamplingParams(max_tokens=16))  # and it is not greedy


def test_top_k_1_is_greedy(loaded):
    session = Session(loaded, context_length=256)
    ids = encode_conversation(loaded.tokenizer, [user("Surprise me.")])
    greedy = answer(session, ids, SamplingParams(max_tokens=16))
    assert answer(session, ids, SamplingParams(temperature=1.5, top_k=1, max_tokens=16, seed=7)) == greedy


def test_stats(loaded):
    session = Session(loaded, context_length=256)
    ids = encode_conversation(loaded.tokenizer, [user("Hello there")])
    answer(session, ids, SamplingParams(max_tokens=8))
    stats = session.stats
    assert stats.prompt_tokens == stats.prefilled_tokens == len(ids)
    assert stats.generated_tokens == 8
    assert stats.time_to_first_token > 0
    assert stats.decode_seconds > 0
    assert stats.tokens_per_second > 0
    assert stats.tokens_per_second == pytest.approx((stats.generated_tokens - 1) / stats.decode_seconds)


def test_two_sessions_on_one_model_do_not_read_each_others_cache(loaded):
    """The model holds one KV cache; a session whose cache another took starts over instead of reading it."""
    ids_a = loaded.tokenizer.encode("first conversation about cats", bos=True)
    ids_b = loaded.tokenizer.encode("second one, about ships and the sea", bos=True)
    params = SamplingParams(max_tokens=12)
    a, b = Session(loaded, context_length=256), Session(loaded, context_length=256)
    answer_a = "".join(a.generate(ids_a, params))
    "".join(b.generate(ids_b, params))
    again = "".join(a.generate(ids_a, params))
    assert again == answer_a
    assert a.stats.prefilled_tokens == len(ids_a)  # started over: b had taken the cache


def test_first_text_arrives_before_the_first_decode_step(loaded):
    """The first token comes from the prompt's logits: its text is handed out before the first decode step runs,
    which on a GPU may wait for the decode graph's compile (tens of seconds), so a start shows text at once."""
    session = Session(loaded, context_length=256)
    events = []
    decode = session.decode
    session.decode = lambda *args: (events.append("decode"), decode(*args))[1]
    for delta in session.generate(encode_conversation(loaded.tokenizer, [user("Hello")]),
                                  SamplingParams(max_tokens=4)):
        events.append("text" if delta else "empty")
    assert events and events[0] == "text", events
