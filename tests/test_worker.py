"""The engine worker with a tiny real checkpoint: load, stream, cancel, reuse the cache, trim, survive errors."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest
from tiny_models import write_tiny_model

from mistral_chat.chat.templates import ChatMessage
from mistral_chat.engine.options import LoadOptions, SamplingParams
from mistral_chat.service.worker import (EngineFailed, EngineWorker, GenerationDone, GenerationStarted, LoadProgress,
                                        ModelReady, TokenDelta)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "mistral")["native"]


class Recorder:
    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def __call__(self, event: object) -> None:
        self.events.put(event)

    def until(self, kind: type, timeout: float = 60.0) -> list:
        seen = []
        while True:
            event = self.events.get(timeout=timeout)
            seen.append(event)
            if isinstance(event, kind):
                return seen


@pytest.fixture
def worker(tiny_model: Path):
    recorder = Recorder()
    engine = EngineWorker(recorder)
    engine.start_thread()
    engine.load(tiny_model, LoadOptions(device="cpu", context_length=128))
    events = recorder.until(ModelReady)
    assert any(isinstance(e, LoadProgress) for e in events)
    assert not events[-1].compiled  # the CPU never compiles: the TUI shows no "compiling" notice
    yield engine, recorder
    engine.shutdown()
    assert engine.stopped.wait(30)


def test_streams_an_answer_then_reuses_the_cache(worker) -> None:
    engine, rec = worker
    first = [ChatMessage("user", "Hello there")]
    engine.generate(1, first, SamplingParams(max_tokens=8))
    events = rec.until(GenerationDone)
    done = events[-1]
    deltas = "".join(e.text for e in events if isinstance(e, TokenDelta))
    assert deltas == done.text and done.text
    assert done.stats.generated_tokens == 8 and done.stats.finish_reason == "length"
    started = next(e for e in events if isinstance(e, GenerationStarted))
    assert started.prompt_tokens == done.stats.prompt_tokens == done.stats.prefilled_tokens

    follow = first + [ChatMessage("assistant", done.text), ChatMessage("user", "And then?")]
    engine.generate(1, follow, SamplingParams(max_tokens=4))
    again = rec.until(GenerationDone)[-1]
    assert again.stats.prefilled_tokens < again.stats.prompt_tokens  # the first turn came from the cache


def test_cancel_keeps_what_was_streamed(worker) -> None:
    engine, rec = worker
    request = engine.generate(2, [ChatMessage("user", "Tell me a long story")], SamplingParams(max_tokens=100))
    rec.until(TokenDelta)
    engine.cancel(request)
    done = rec.until(GenerationDone)[-1]
    assert done.stats.finish_reason in ("cancelled", "length")
    assert done.stats.generated_tokens < 100 or done.stats.finish_reason == "length"


def test_long_history_is_trimmed_but_the_system_prompt_stays(worker) -> None:
    engine, rec = worker
    history = [ChatMessage("system", "Be brief.")]
    for i in range(12):
        history += [ChatMessage("user", f"question number {i} " * 3), ChatMessage("assistant", f"answer {i} " * 3)]
    history.append(ChatMessage("user", "last question"))
    engine.generate(3, history, SamplingParams(max_tokens=4))
    events = rec.until(GenerationDone)
    started = next(e for e in events if isinstance(e, GenerationStarted))
    assert started.dropped_messages > 0 and started.dropped_messages % 2 == 0
    assert started.prompt_tokens <= 128 - 4
    assert events[-1].stats.finish_reason in ("length", "stop")


def test_errors_become_events_and_the_worker_lives_on(worker, tmp_path: Path) -> None:
    engine, rec = worker
    engine.load(tmp_path / "nothing-here", LoadOptions(device="cpu"))
    failed = rec.until(EngineFailed)[-1]
    assert failed.during == "load" and "nothing-here" in failed.message
    engine.generate(4, [ChatMessage("user", "hi")], SamplingParams(max_tokens=2))
    events = rec.until(GenerationDone)
    assert any(isinstance(e, EngineFailed) and "no model" in e.message for e in events)


# ---- function calling -------------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tool_calls_are_read_from_real_token_ids(tiny_model: Path, tmp_path: Path) -> None:
    """The worker's reading of an answer: real ids of calls as the tokenizer encodes them, by [TOOL_CALLS] id."""
    from tiny_models import copy_tokenizer

    from mistral_chat.chat.tools import ToolCall, encode_tool_calls, tool_format
    from mistral_chat.service.worker import read_tool_calls
    from mistral_chat.text.tokenizer import load_tokenizer

    calls = (ToolCall("abcDEF123", "get_weather", '{"city": "Paris"}'), ToolCall("xyz987QWE", "get_time", "{}"))
    for version in ("v3", "v7"):
        folder = tmp_path / version
        copy_tokenizer(folder, version)
        tokenizer = load_tokenizer(folder)
        ids = tokenizer.encode("Let me check.") + encode_tool_calls(tokenizer, tool_format(tokenizer), calls)
        read = read_tool_calls(tokenizer, ids + [tokenizer.eos_id], tokenizer.decode(ids))
        assert read.calls == calls and not read.error
        assert read.text == ("Let me check." if version == "v7" else "")  # v3 has no text with calls

        plain = tokenizer.encode("[TOOL_CALLS] is just text here")  # the text, not the token: no call
        assert read_tool_calls(tokenizer, plain, "streamed").calls == ()
        assert read_tool_calls(tokenizer, plain, "streamed").text == "streamed"

        broken = [tokenizer.special_id("[TOOL_CALLS]"), *tokenizer.encode('[{"name": "get_weather", "arguments": {')]
        read = read_tool_calls(tokenizer, broken, "ignored")
        assert read.calls == () and "not valid JSON" in read.error
        assert read.text == tokenizer.decode(broken) and read.text.startswith('[{"name"')


def test_tool_results_are_encoded_with_the_tools_and_answered(worker, tmp_path: Path) -> None:
    """A conversation ending in a tool result: the prompt is encode_conversation(..., tools) and the model answers."""
    import json

    from mistral_chat.chat.templates import encode_conversation
    from mistral_chat.chat.tools import ToolCall, load_tools

    engine, rec = worker
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER_TOOL]))
    tools = load_tools(tmp_path / "tools.json")
    call = ToolCall("abcDEF123", "get_weather", '{"city": "Paris"}')
    messages = [ChatMessage("user", "Weather in Paris?"), ChatMessage("assistant", "", tool_calls=[call]),
                ChatMessage("tool", '{"temperature": 21}', tool_call_id=call.id, name=call.name)]
    engine.generate(7, messages, SamplingParams(max_tokens=5), tools)
    events = rec.until(GenerationDone)
    started = next(e for e in events if isinstance(e, GenerationStarted))
    expected = encode_conversation(engine.loaded.tokenizer, messages, tools)
    assert started.tools_used and started.prompt_tokens == len(expected)
    assert engine.session.tokens[:len(expected)] == expected
    done = events[-1]
    assert done.stats.generated_tokens > 0 or done.stats.finish_reason == "stop"
    assert done.tool_calls == () and not done.tool_call_error


def test_model_ready_says_whether_the_loaded_model_compiles(tmp_path: Path) -> None:
    from types import SimpleNamespace

    recorder = Recorder()
    engine = EngineWorker(recorder, loader=lambda request, progress: SimpleNamespace(compile=True),
                          session_factory=lambda loaded, context: SimpleNamespace(context_length=64))
    engine.start_thread()
    engine.load(tmp_path, LoadOptions(device="cuda"))
    ready = recorder.until(ModelReady)[-1]
    engine.shutdown()
    assert ready.compiled and engine.stopped.wait(30)
