"""The TUI keeps up with the engine: tokens are gathered and shown in batches, the status bar counts them live.

Counts, not wall time: an engine faster than any screen streams thousands of tokens; the screen must take them
in a few tens of updates a second, with no Textual message per token, and show every one of them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tiny_models import write_tiny_model
from tui_helpers import FastSession, SlowSession, isolated_home, make_app, wait_for  # noqa: F401 - autouse

from mistral_chat.service.worker import TokenDelta
from mistral_chat.tui.engine_messages import EngineMessage
from mistral_chat.tui.safe_text import displayable
from mistral_chat.tui.streaming import (CPU_UI_SHARE, FLUSH_SECONDS, SLOWEST_FLUSH_SECONDS, STATUS_SECONDS, UI_SHARE,
                                       FlushPace, Streaming, TokenBuffer, Tokens)
from mistral_chat.tui.widgets.message_view import MessageView
from mistral_chat.tui.widgets.status_bar import StatusBar


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "mistral")["native"]


async def send(pilot, text: str) -> None:
    prompt = pilot.app.chat.prompt
    prompt.focus()
    prompt.load_text(text)
    await pilot.press("enter")


def count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[float]:
    """Record the time of every call of `cls.name`."""
    calls: list[float] = []
    original = getattr(cls, name)

    async def counted(self, *args, **kwargs):
        calls.append(time.monotonic())
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


async def test_a_fast_engine_is_shown_in_batches_not_one_message_per_token(tiny_model: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = 3000
    app = make_app(tmp_path / "chats.db", tiny_model,
                   session_factory=lambda loaded, ctx: FastSession(loaded, ctx, words=tokens, pause_every=20,
                                                                   pause=0.01))
    messages: list[object] = []
    post = app.post_message

    def counting(message):
        if isinstance(message, EngineMessage):
            messages.append(message.event)
        return post(message)

    app.post_message = counting
    appends = count_calls(monkeypatch, MessageView, "append")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        messages.clear()
        started = time.monotonic()
        await send(pilot, "Count")
        info = lambda: app.chat.status.info  # noqa: E731
        await wait_for(pilot, lambda: app.chat.streaming is None and not info().generating
                       and info().generated_tokens == tokens, timeout=60, what="the answer")
        seconds = time.monotonic() - started
        view = app.chat.chat_log.last_view("assistant")
        expected = "".join(f"word{i} " for i in range(tokens))
        assert view is not None and view.text == expected  # every token shown
        assert view.markdown is not None and view.markdown.source == expected
        assert app.store.load(app.chat.conversation.id).messages[-1].content == expected
        assert not [m for m in messages if isinstance(m, TokenDelta)]  # no message per token
        assert len(messages) == 2, messages  # GenerationStarted, GenerationDone
        # screen updates: a few tens a second at most, far fewer than tokens, and while it streams at least one
        # every SLOWEST_FLUSH_SECONDS (the pace slows to that when updates cost much, as on a loaded machine)
        print(f"\n{tokens} tokens in {seconds:.2f} s: {len(appends)} screen updates, {len(messages)} engine messages")
        fewest = max(2, int(seconds / SLOWEST_FLUSH_SECONDS) - 1)
        assert fewest <= len(appends) <= seconds / FLUSH_SECONDS + 3 and len(appends) <= tokens / 20, \
            (len(appends), seconds)
        assert app.chat.status.info.generated_tokens == tokens


async def test_the_status_bar_counts_tokens_and_speed_live(tiny_model: Path, tmp_path: Path) -> None:
    app = make_app(tmp_path / "chats.db", tiny_model,
                   session_factory=lambda loaded, ctx: SlowSession(loaded, ctx, delay=0.01, words=400))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        status = app.chat.status
        status.update_info(time_to_first_token=9.9, tokens_per_second=999.0)  # a previous answer's figures
        await send(pilot, "Count")
        assert status.info.time_to_first_token != 9.9 and status.info.tokens_per_second != 999.0  # not stale
        await wait_for(pilot, lambda: (status.info.generated_tokens or 0) >= 20, timeout=20, what="a live count")
        seen = status.info
        assert seen.generating and seen.tokens_per_second is not None and seen.tokens_per_second != 999.0
        assert f"{seen.generated_tokens} tok" in status.text and "tok/s" in status.text
        await wait_for(pilot, lambda: (status.info.generated_tokens or 0) > seen.generated_tokens + 10,
                       timeout=20, what="the count to grow")
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.chat.streaming is None, what="the stop")


async def test_a_streamed_answer_shown_in_few_updates_is_complete_and_exact(tiny_model: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Markdown split anywhere across tokens (fences, lists, emphasis, a table, control characters), taken in
    batches at a slow pace: the answer's Markdown ends with exactly the text (less control characters), the
    stored answer with exactly what the model said."""
    pieces = ["Intro *emph", "asis* and `co", "de`.\n\n- it", "em one\n- item", " two\n\n```py", "thon\nprint(",
              "'hi')\n``", "`\n\n| a | b |\n|", "---|---|\n| 1 ", "| 2 |\n\nEnd \x1b[31m", "red\x07 done."] * 20
    answer = "".join(pieces)
    app = make_app(tmp_path / "chats.db", tiny_model,
                   session_factory=lambda loaded, ctx: FastSession(loaded, ctx, texts=pieces, pause_every=11,
                                                                   pause=0.02))
    appends = count_calls(monkeypatch, MessageView, "append")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        await send(pilot, "Write")
        await wait_for(pilot, lambda: app.chat.streaming is None and not app.chat.status.info.generating,
                       timeout=60, what="the answer")
        view = app.chat.chat_log.last_view("assistant")
        assert view is not None and view.text == answer
        assert view.markdown is not None and view.markdown.source == displayable(answer)
        assert "\x1b" not in view.markdown.source and "\x07" not in view.markdown.source
        assert app.store.load(app.chat.conversation.id).messages[-1].content == answer
        assert 1 <= len(appends) < len(pieces) / 4  # batched
        assert app.chat.status.info.generated_tokens == len(pieces)


async def test_the_status_bar_counts_between_text_updates_and_the_cursor_holds_still(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text updates as seldom as the pace allows (every SLOWEST_FLUSH_SECONDS here); the live count goes on
    every STATUS_SECONDS in between. A model on the CPU gets the CPU's UI share."""
    app = make_app(tmp_path / "chats.db", tiny_model,
                   session_factory=lambda loaded, ctx: FastSession(loaded, ctx, words=600, pause_every=10,
                                                                   pause=0.04))  # ~2.4 s
    appends = count_calls(monkeypatch, MessageView, "append")
    counts: list[int] = []
    update_info = StatusBar.update_info

    def recording(self, **changes):
        if "generated_tokens" in changes and self.info.generating:
            counts.append(changes["generated_tokens"])
        return update_info(self, **changes)

    monkeypatch.setattr(StatusBar, "update_info", recording)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        assert app.flush_pace.share == CPU_UI_SHARE  # the tiny model runs on the CPU
        app.flush_pace.share = 1e-6  # every text update costs too much: one every SLOWEST_FLUSH_SECONDS
        await send(pilot, "Count")
        await wait_for(pilot, lambda: app.chat.streaming is not None and app.chat.streaming.tokens > 0,
                       what="the first tokens")
        assert app.chat.prompt.cursor_blink is False
        await wait_for(pilot, lambda: app.chat.streaming is None and not app.chat.status.info.generating,
                       timeout=60, what="the answer")
        assert app.chat.prompt.cursor_blink is True
        live = [n for n in counts if n]
        print(f"\n{len(appends)} text updates, {len(live)} live counts: {live}")
        assert app.flush_pace.interval == SLOWEST_FLUSH_SECONDS
        assert len(live) >= len(appends) + 2 and live == sorted(live)
        assert app.chat.chat_log.last_view("assistant").text == "".join(f"word{i} " for i in range(600))
    assert STATUS_SECONDS < SLOWEST_FLUSH_SECONDS


def test_token_buffer_gathers_per_request_and_keeps_order() -> None:
    buffer = TokenBuffer()
    for i in range(5):
        buffer.add(TokenDelta(1, 7, f"a{i}"))
    buffer.add(TokenDelta(2, 8, "b"))
    taken = buffer.take()
    assert [(t.request_id, t.text, t.count) for t in taken] == [(1, "a0a1a2a3a4", 5), (2, "b", 1)]
    assert buffer.take() == []


def test_streaming_live_figures() -> None:
    streaming = Streaming(1, 1, None, started_at=10.0)
    assert streaming.live_figures(now=11.0) == (None, None)
    streaming.receive(Tokens(1, 1, "a", 1), now=10.5)
    streaming.receive(Tokens(1, 1, "bcd", 10), now=11.0)
    first, rate = streaming.live_figures(now=11.5)
    assert first == pytest.approx(0.5) and rate == pytest.approx(10 / 1.0)
    assert streaming.text == "abcd" and streaming.tokens == 11


def test_flush_pace_slows_down_when_updates_cost_the_ui_thread_much_and_speeds_up_when_cheap() -> None:
    pace = FlushPace()
    now, cpu = 100.0, 0.0
    assert pace.due(now, cpu)  # the first tokens show at once
    assert not pace.due(now + FLUSH_SECONDS / 4, cpu)
    for _ in range(20):  # every update costs the UI thread half of the time between them
        step = pace.interval
        now, cpu = now + step, cpu + step / 2
        assert pace.due(now, cpu)
    assert pace.interval == SLOWEST_FLUSH_SECONDS
    for _ in range(40):  # cheap again: back to ~30 a second
        step = pace.interval
        now, cpu = now + step, cpu + step * UI_SHARE / 4
        assert pace.due(now, cpu)
    assert pace.interval == FLUSH_SECONDS
    slow = pace.interval
    now += 60  # a pause between answers measures nothing
    assert pace.due(now, cpu + 30) and pace.interval == slow


def test_the_cpu_pace_aims_at_a_smaller_ui_share() -> None:
    """Updates that cost 3% of the time between them: cheap enough for the default share, too dear on the CPU."""
    for share, settles_at in ((UI_SHARE, FLUSH_SECONDS), (CPU_UI_SHARE, SLOWEST_FLUSH_SECONDS)):
        pace = FlushPace(share)
        now, cpu = 100.0, 0.0
        assert pace.due(now, cpu)
        for _ in range(40):
            step = pace.interval
            now, cpu = now + step, cpu + step * 0.03
            assert pace.due(now, cpu)
        assert pace.interval == pytest.approx(settles_at)
