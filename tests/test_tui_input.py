"""The chat input and what the screen says (issue 28), hostile text and a broken disk (issue 29), with Pilot."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from textual import events
from tui_helpers import (FastSession, close_welcome, isolated_home, make_app, record_notes,  # noqa: F401 - autouse
                         wait_for)

from mistral_chat.chat.conversation import Conversation, Message
from mistral_chat.chat.store import ChatStore
from mistral_chat.tui.safe_text import displayable
from mistral_chat.tui.widgets.status_bar import StatusInfo, status_text


def seeded(db: Path, *messages: tuple[str, str], title: str = "Seeded") -> int:
    store = ChatStore(db)
    conversation = store.create_conversation(title)
    for role, text in messages:
        store.add_message(conversation.id, role, text)
    store.close()
    return conversation.id


# ---- the chat input --------------------------------------------------------------------------------------------

async def test_text_and_enter_arriving_in_one_burst_are_sent(tmp_path: Path) -> None:
    """Keys queued together (a paste, tmux send-keys, a slow link): Enter must see the text typed before it."""
    app = make_app(tmp_path / "chats.db", None)
    async with app.run_test(size=(100, 30)) as pilot:
        await close_welcome(pilot)
        app.chat.prompt.focus()
        for key, character in [("h", "h"), ("i", "i"), ("enter", "\r")]:  # posted without waiting in between
            app.post_message(events.Key(key, character))
        await wait_for(pilot, lambda: app.chat.conversation.messages, timeout=5, what="the message")
        assert [m.content for m in app.chat.conversation.messages] == ["hi"]
        assert app.chat.conversation.title == "hi"
        assert app.chat.prompt.text == ""


def test_alt_enter_from_an_xterm_style_terminal_is_read_as_alt_enter() -> None:
    import mistral_chat.tui.widgets.prompt_input  # noqa: F401 - teaches the key reader ESC CR
    from textual._xterm_parser import XTermParser

    keys = [event.key for event in XTermParser().feed("ab\x1b\rcd") if isinstance(event, events.Key)]
    assert keys == ["a", "b", "alt+enter", "c", "d"]


async def test_alt_enter_adds_a_line_and_the_message_is_shown_as_typed(tmp_path: Path) -> None:
    app = make_app(tmp_path / "chats.db", None)
    async with app.run_test(size=(100, 30)) as pilot:
        await close_welcome(pilot)
        prompt = app.chat.prompt
        prompt.focus()
        await pilot.press(*"one")
        await pilot.press("alt+enter")
        await pilot.press(*"*two*")
        assert prompt.text == "one\n*two*"
        prompt.load_text("first line\n  indented `code` and *stars*\n\n# not a heading")
        prompt.move_cursor(prompt.document.end)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.chat_log.views, timeout=5, what="the message")
        view = app.chat.chat_log.views[0]
        shown = str(view.query_one(".body").render())
        assert shown == "first line\n  indented `code` and *stars*\n\n# not a heading"


async def test_up_after_a_restart_recalls_the_chats_own_messages(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    seeded(db, ("user", "first question"), ("assistant", "an answer"), ("user", "second\nquestion"))
    app = make_app(db, None)
    async with app.run_test(size=(100, 30)) as pilot:
        await close_welcome(pilot)
        app.chat.prompt.focus()
        await pilot.press("up")
        assert app.chat.prompt.text == "second\nquestion"
        app.chat.prompt.move_cursor((0, 0))
        await pilot.press("up")
        assert app.chat.prompt.text == "first question"


# ---- what the screen says ------------------------------------------------------------------------------------------

def test_the_status_bar_fits_80_columns_keeping_speed_and_the_stop_hint() -> None:
    info = StatusInfo(model="mistral-7b-instruct-v0.3", device="cuda:0", dtype="bfloat16", context_used=12345,
                      context_length=32768, trimmed_messages=4, time_to_first_token=0.085, tokens_per_second=187.3,
                      generated_tokens=420, generating=True)
    for width in (80, 60, 50):
        line = status_text(info, width)
        assert len(line) <= width, line
        assert "187.3 tok/s" in line and "generating (Esc stops)" in line, line
    assert "cuda:0 bfloat16" in status_text(info, 200)
    narrow = status_text(StatusInfo(model="a-very-long-model-name-that-goes-on-and-on", tokens_per_second=50.0), 30)
    assert len(narrow) <= 30 and "50.0 tok/s" in narrow and narrow.startswith("a-very")


async def test_a_reopened_chat_shows_its_context_and_a_new_chat_no_stale_figures(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    seeded(db, ("user", "x" * 4000), ("assistant", "y" * 4000))
    app = make_app(db, None)
    async with app.run_test(size=(120, 30)) as pilot:
        await close_welcome(pilot)
        status = app.chat.status
        status.update_info(context_length=32768)
        assert status.info.context_used >= 1500 and status.info.context_estimated
        assert "ctx ~2000/32768" in status.text
        status.update_info(time_to_first_token=0.1, tokens_per_second=50.0, generated_tokens=30)
        await pilot.press("ctrl+n")
        await pilot.pause()
        info = status.info
        assert (info.time_to_first_token, info.tokens_per_second, info.generated_tokens) == (None, None, None)
        assert info.context_used == 0 and "tok/s" not in status.text


async def test_the_sidebar_gives_way_in_a_narrow_terminal(tmp_path: Path) -> None:
    app = make_app(tmp_path / "chats.db", None)
    async with app.run_test(size=(50, 24)) as pilot:
        await close_welcome(pilot)
        assert app.chat.sidebar.size.width <= 20
        assert app.chat.query_one("#chat-pane").size.width >= 30


async def test_dialog_text_wraps_in_a_narrow_terminal(tmp_path: Path) -> None:
    from mistral_chat.tui.screens.confirm import ConfirmScreen

    app = make_app(tmp_path / "chats.db", None)
    async with app.run_test(size=(50, 24)) as pilot:
        await close_welcome(pilot)
        question = "Delete the chat “A long title that will not fit in fifty columns” and its 12 messages?"
        app.push_screen(ConfirmScreen(question))
        await pilot.pause()
        label = app.screen.query_one("#question")
        assert label.size.height >= 2 and label.region.right <= 50
        assert label.region.width <= 46


async def test_welcome_screen_with_registered_models_does_not_say_there_are_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mistral_chat.tui import model_choices

    monkeypatch.setattr(model_choices, "local_models", lambda: [model_choices.ModelChoice(f"m{i}", tmp_path)
                                                                 for i in range(3)])
    app = make_app(tmp_path / "chats.db", None)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: bool(app.screen.query("#welcome-text")), timeout=10, what="the welcome")
        text = str(app.screen.query_one("#welcome-text").render())
        assert "No model to open yet" not in text and "3 models are ready" in text


async def test_copy_says_what_it_did_not_that_the_clipboard_has_it(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    seeded(db, ("user", "hi"), ("assistant", "hello there"))
    app = make_app(db, None)
    notes = record_notes(app)
    async with app.run_test(size=(100, 30)) as pilot:
        await close_welcome(pilot)
        await pilot.press("f3")
        await pilot.pause()
    note = notes[-1]
    assert "copied to the clipboard" not in note
    assert "sent to the terminal's clipboard" in note and "OSC 52" in note


def test_exports_name_the_model() -> None:
    conversation = Conversation(1, "T", messages=[Message("user", "hi", 1), Message("assistant", "yo", 2)])
    assert json.loads(conversation.to_json("mistral-7b-instruct"))["model"] == "mistral-7b-instruct"
    assert "Model: mistral-7b-instruct" in conversation.to_markdown("mistral-7b-instruct")


# ---- hostile text ------------------------------------------------------------------------------------------------

HOSTILE = "\x1b]0;PWNED\x07Hello \x1b[31mred\x1b[0m [bold]not bold[/bold] \x9b2J\x07 end\r\n"


def test_displayable_drops_control_characters_but_newlines_and_tabs() -> None:
    assert displayable(HOSTILE) == "]0;PWNEDHello [31mred[0m [bold]not bold[/bold] 2J end\n"
    assert displayable("a\tb\nc") == "a\tb\nc"


async def test_model_output_control_sequences_never_reach_the_terminal(tmp_path: Path) -> None:
    from tiny_models import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny", "mistral")["native"]
    pieces = ["\x1b]0;PW", "NED\x07Hello ", "\x1b[31", "mred\x1b[0m ", "[bold]not bold[/bold]", " \x9b2J"]
    app = make_app(tmp_path / "chats.db", model,
                   session_factory=lambda loaded, ctx: FastSession(loaded, ctx, texts=pieces))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        app.chat.prompt.load_text("hi")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.streaming is None and len(app.chat.chat_log.views) == 2,
                       what="the answer")
        await pilot.pause()
        stored = app.store.load(app.chat.conversation.id).messages[-1].content
        assert stored == "".join(pieces)  # kept exactly on disk
        view = app.chat.chat_log.views[-1]
        assert view.markdown is not None and view.markdown.source == displayable(stored)
        screen = app.export_screenshot()
        assert "\x1b" not in screen and "\x9b" not in screen and "\x07" not in screen
        assert "[bold]not" in screen.replace("&#160;", " ")


# ---- a broken disk ---------------------------------------------------------------------------------------------

async def test_export_to_an_unwritable_folder_says_so_and_keeps_running(tmp_path: Path,
                                                                         isolated_home: Path) -> None:
    db = tmp_path / "chats.db"
    seeded(db, ("user", "hi"), ("assistant", "hello"))
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "exports").write_text("a file where the folder should be")
    app = make_app(db, None)
    notes = record_notes(app)
    async with app.run_test(size=(100, 30)) as pilot:
        await close_welcome(pilot)
        assert app.chat.export("markdown") is None
        assert app.is_running
    assert any("cannot write" in n and "exports" in n for n in notes), notes


async def test_a_database_that_refuses_writes_keeps_the_message_and_says_why(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(tmp_path / "chats.db", None)
    notes = record_notes(app)

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    async with app.run_test(size=(100, 30)) as pilot:
        await close_welcome(pilot)
        monkeypatch.setattr(app.store, "add_message", refuse)
        app.chat.prompt.load_text("keep me")
        app.chat.prompt.focus()
        await pilot.press("enter")
        await pilot.pause()
        assert app.is_running and app.chat.prompt.text == "keep me"
    assert any("readonly" in n and "conversations" not in n or "not writable" in n for n in notes), notes


async def test_a_damaged_database_stops_the_app_with_one_line_and_is_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    store = ChatStore(db)
    for i in range(40):
        conversation = store.create_conversation(f"chat {i}")
        store.add_message(conversation.id, "user", "x" * 3000)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(db.read_bytes())
    page = 4096
    for offset in range(2 * page, len(data), page):  # every page after the schema: garbage
        data[offset:offset + 64] = b"\xff" * 64
    db.write_bytes(bytes(data))
    before = hashlib.sha256(db.read_bytes()).hexdigest()

    from mistral_chat.tui.app import CannotStart

    app = make_app(db, None)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.cannot_start is not None or not app.is_running, timeout=10,
                       what="the app to give up")
    assert isinstance(app.cannot_start, CannotStart) and app.return_code == 1
    message = str(app.cannot_start)
    assert str(db) in message and "move it aside" in message and "\n" not in message
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
