"""The Python API (mistral_chat.api.Model) on a tiny random checkpoint, float32 on the CPU."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_chat import Model, Reply
from mistral_chat.api import ChatRequest, MessageError, make_reply, to_chat_messages, to_tools
from mistral_chat.chat.templates import ChatMessage, encode_conversation
from mistral_chat.chat.tools import ToolCall
from mistral_chat.engine.generate import Session
from mistral_chat.engine.options import SamplingParams
from mistral_chat.engine.stats import GenerationStats
from mistral_chat.errors import MistralChatError
from tiny_models import write_tiny_model

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function",
           "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}}
HI = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("api"), "mistral")["native"]


@pytest.fixture(scope="module")
def model(tiny):
    with Model.load(tiny, device="cpu", dtype="float32", context=256) as m:
        yield m


def test_import_mistral_chat_imports_no_torch():
    code = ("import sys, mistral_chat; from mistral_chat import Model, Reply; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(Model.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "mistral_chat.api"


def test_chat_equals_the_engine_session(model):
    reply = model.chat(HI, max_tokens=12)
    assert isinstance(reply, Reply)
    session = Session(model.loaded, context_length=256)
    ids = encode_conversation(model.loaded.tokenizer, [ChatMessage("user", "Hi there")])
    assert reply.text == "".join(session.generate(ids, SamplingParams(max_tokens=12)))
    assert reply.finish_reason == "length" and reply.tool_calls == ()
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.generated_tokens == 12
    assert reply.usage.time_to_first_token > 0 and reply.usage.tokens_per_second > 0
    assert model.tokenizer.encode_chat(HI) == ids


def test_stream_yields_the_chat_text(model):
    pieces = list(model.stream(HI, max_tokens=10))
    assert len(pieces) > 1
    assert "".join(pieces) == model.chat(HI, max_tokens=10).text
    assert model.last_reply is not None and model.last_reply.usage.generated_tokens == 10


def test_sampling_keywords_are_the_sampling_params_fields(model):
    fields = set(SamplingParams.__dataclass_fields__)
    for method in (Model.chat, Model.stream, Model.chat_batch):
        keywords = {p.name for p in inspect.signature(method).parameters.values() if p.kind == p.KEYWORD_ONLY}
        assert fields <= keywords, method.__name__
    seeded = dict(max_tokens=8, temperature=0.9, top_p=0.95, top_k=40, seed=11, min_p=0.01, repetition_penalty=1.1,
                  presence_penalty=0.2, stop=["never-there"])
    assert model.chat(HI, **seeded).text == model.chat(HI, **seeded).text
    with pytest.raises(ValueError, match="temperature"):
        model.chat(HI, temperature=-1)


def test_chat_batch_answers_in_order_as_one_at_a_time(model):
    conversations = [HI,
                     [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "A long story please"}],
                     [{"role": "user", "content": "x"}]]
    alone = [model.chat(c, max_tokens=10) for c in conversations]
    together = model.chat_batch(conversations, max_tokens=10, batch_size=2)
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.usage.prompt_tokens for r in together] == [r.usage.prompt_tokens for r in alone]
    assert model.chat(HI, max_tokens=10) == dataclasses.replace(alone[0], usage=model.last_reply.usage)


def test_chat_requests_give_errors_for_bad_requests_and_answer_the_others(model):
    requests = [ChatRequest(HI, params=SamplingParams(max_tokens=3)),
                ChatRequest([{"role": "assistant", "content": "ends with the assistant"}]),
                ChatRequest([{"role": "user", "content": "word " * 400}], params=SamplingParams(max_tokens=3)),
                ChatRequest([{"role": "user", "content": "Hello"}], params=SamplingParams(max_tokens=4))]
    outcomes = dict(model.chat_requests(requests))
    assert sorted(outcomes) == [0, 1, 2, 3]
    assert isinstance(outcomes[1], MistralChatError) and isinstance(outcomes[2], MistralChatError)
    assert "context" in str(outcomes[2])
    assert outcomes[0].usage.generated_tokens == 3 and outcomes[3].usage.generated_tokens == 4


def test_openai_messages_with_tool_calls_and_results(model):
    messages = [{"role": "system", "content": "You help."},
                {"role": "user",
                 "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "abc123def", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "abc123def", "name": "get_weather", "content": "22C"}]
    chat = to_chat_messages(messages)
    assert chat[1] == ChatMessage("user", "Weather in Paris?")
    assert chat[2].tool_calls == (ToolCall("abc123def", "get_weather", "{\"city\": \"Paris\"}"),)
    assert chat[3] == ChatMessage("tool", "22C", tool_call_id="abc123def", name="get_weather")
    tools = to_tools([WEATHER])
    ids = model.tokenizer.encode_chat(messages, tools=[WEATHER])
    assert ids == encode_conversation(model.loaded.tokenizer, chat, list(tools))
    assert model.loaded.tokenizer.special_id("[TOOL_RESULTS]") in ids
    reply = model.chat(messages, tools=[WEATHER], max_tokens=4)
    assert reply.usage.prompt_tokens == len(ids)
    for bad, field in ([{"role": "wizard", "content": "x"}], "role"), ([{"role": "user", "content": 3}], "content"), \
            ([{"role": "user", "content": "x", "tool_calls": [{}]}], "tool_calls"), ([], "no messages"):
        with pytest.raises(MessageError, match=field):
            to_chat_messages(bad)


def test_a_reply_reads_tool_calls_from_the_generated_ids(model):
    tokenizer = model.loaded.tokenizer
    calls = '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}]'
    ids = [tokenizer.special_id("[TOOL_CALLS]")] + tokenizer.encode(calls)
    stats = GenerationStats(prompt_tokens=7, generated_tokens=len(ids), finish_reason="stop")
    reply = make_reply(tokenizer, tokenizer.decode(ids), ids, stats, to_tools([WEATHER]))
    assert reply.finish_reason == "tool_calls" and reply.text == ""
    assert reply.tool_calls == (ToolCall("abc123def", "get_weather", '{"city": "Paris"}'),)
    assert reply.to_json()["tool_calls"][0]["function"]["name"] == "get_weather"
    plain = make_reply(tokenizer, "just text", ids, stats, ())
    assert plain.tool_calls == () and plain.finish_reason == "stop" and plain.text == "just text"


def test_tokenizer(model):
    tok = model.tokenizer
    ids = tok.encode("Hello world")
    assert tok.decode(ids) == "Hello world"
    assert tok.encode("Hello world", bos=True)[0] == tok.bos_id
    assert tok.version == "v3" and tok.supports_tools and tok.vocab_size == 32768


def test_context_manager_frees_the_model(tiny):
    with Model.load(str(tiny), device="cpu", dtype="float32", context=64) as m:
        assert m.context_length == 64 and m.device == "cpu" and m.dtype == "float32"
        assert m.chat(HI, max_tokens=2).usage.generated_tokens == 2
    assert m.loaded is None and repr(m) == "Model(closed)"
    with pytest.raises(MistralChatError, match="closed"):
        m.chat(HI)
    m.close()  # twice is fine
