"""The model picker, the F1 help and the exports of a stopped answer (issue 28, "What the screen says")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import write_tiny_model
from tui_helpers import close_welcome, isolated_home, make_app, wait_for  # noqa: F401 - autouse fixture

from mistral_chat.chat.store import ChatStore


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "mistral")["native"]


@pytest.fixture
def three_models(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Three registered copies of the tiny model (alpha, beta, gamma), with an empty Hugging Face cache."""
    from mistral_chat.models.pull import pull_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    folders = []
    for name in ("alpha", "beta", "gamma"):
        folder = tmp_path / "models" / name
        shutil.copytree(tiny_folder, folder)
        pull_model(str(folder))
        folders.append(folder)
    return folders


def option_texts(picker) -> list[str]:
    from textual.widgets import OptionList

    options = picker.query_one("#models", OptionList)
    return [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]


def highlighted_text(picker) -> str | None:
    from textual.widgets import OptionList

    options = picker.query_one("#models", OptionList)
    if options.highlighted is None:
        return None
    return str(options.get_option_at_index(options.highlighted).prompt)


async def open_picker(pilot):
    from mistral_chat.tui.screens.model_picker import ModelPickerScreen

    await pilot.press("ctrl+o")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ModelPickerScreen) and bool(pilot.app.screen.choices),
                   timeout=15, what="the picker's models")
    await pilot.pause()
    return pilot.app.screen


async def test_model_picker_highlights_filters_shows_sizes_as_list_does(three_models: list[Path],
                                                                         tmp_path: Path) -> None:
    from mistral_chat.models.pull import human_count
    from mistral_chat.models.store import list_models

    params = {row.name: row.parameters for row in list_models()}
    assert set(params) == {"alpha", "beta", "gamma"}
    app = make_app(tmp_path / "chats.db", None)
    async with app.run_test(size=(100, 30)) as pilot:
        await close_welcome(pilot)
        picker = await open_picker(pilot)
        texts = option_texts(picker)
        assert [t.split()[0] for t in texts] == ["alpha", "beta", "gamma"]
        assert highlighted_text(picker) == texts[0]  # Enter right away loads something
        assert f"{human_count(params['alpha'])} params" in texts[0]  # 4.3M as `list` shows, not 0.0B
        assert "0.0B" not in texts[0]
        assert "loaded" not in " ".join(texts)  # nothing is loaded yet
        await pilot.press("g", "a", "m")
        await pilot.pause()
        texts = option_texts(picker)
        assert [t.split()[0] for t in texts] == ["gamma"] and highlighted_text(picker) == texts[0]
        await pilot.press("backspace", "backspace", "backspace", "z", "z")
        await pilot.pause()
        assert option_texts(picker) == []
        assert "No model matches" in str(picker.query_one("#picker-status").render())
        await pilot.press("backspace", "backspace", "b")
        await pilot.pause()
        assert highlighted_text(picker).split()[0] == "beta"  # type: ignore[union-attr]
        loaded = []
        app.load_model = lambda path, name: loaded.append((path, name))  # type: ignore[method-assign]
        await pilot.press("enter")
        await pilot.pause()
        assert loaded == [(three_models[1], "beta")]


async def test_model_picker_marks_and_highlights_the_loaded_model(three_models: list[Path], tmp_path: Path) -> None:
    app = make_app(tmp_path / "chats.db", None)
    async with app.run_test(size=(100, 30)) as pilot:
        await close_welcome(pilot)
        # as if gamma were loaded (no engine runs here)
        app.model_state, app.model_name, app.model_path = "ready", "gamma", three_models[2]
        picker = await open_picker(pilot)
        texts = option_texts(picker)
        marked = [t for t in texts if "(loaded)" in t]
        assert len(marked) == 1 and marked[0].split()[1] == "gamma"
        assert highlighted_text(picker) == marked[0]
        await pilot.press("up")
        await pilot.pause()
        assert highlighted_text(picker).split()[0] == "beta"  # type: ignore[union-attr]


def screen_text(app) -> str:
    """The screen as plain text, one line a row."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def test_help_wraps_long_cells_at_a_narrow_width(tmp_path: Path) -> None:
    from mistral_chat.tui.screens.help import KEYS

    app = make_app(tmp_path / "chats.db", None)
    async with app.run_test(size=(60, 50)) as pilot:
        await close_welcome(pilot)
        await pilot.press("f1")
        await pilot.pause()
        text = screen_text(app)
    words = set(text.replace("│", " ").split())
    for where, key, action in KEYS[:3]:  # the longest action is the second row's
        for word in action.split():
            assert word in words, f"{word!r} of {action!r} is cut off:\n{text}"
    assert "…" not in text


def stopped_conversation(db: Path):
    store = ChatStore(db)
    conversation = store.create_conversation("Stopped")
    store.add_message(conversation.id, "user", "Count")
    message = store.add_message(conversation.id, "assistant", "word0 word1")
    store.set_finish_reason(message.id, "cancelled")
    store.add_message(conversation.id, "user", "Again")
    store.add_message(conversation.id, "assistant", "done", finish_reason="stop")
    loaded = store.load(conversation.id)
    store.close()
    return loaded


def test_stopped_answers_are_marked_in_both_exports(tmp_path: Path) -> None:
    conversation = stopped_conversation(tmp_path / "chats.db")
    assert [m.finish_reason for m in conversation.messages] == [None, "cancelled", None, "stop"]
    markdown = conversation.to_markdown("tiny")
    assert "word0 word1\n\n*(stopped)*" in markdown
    assert markdown.count("(stopped)") == 1
    data = json.loads(conversation.to_json("tiny"))
    assert [m["finish_reason"] for m in data["messages"]] == [None, "cancelled", None, "stop"]


async def test_escape_stores_cancelled_and_the_exports_say_so(tmp_path: Path, isolated_home: Path,
                                                              tiny_folder: Path) -> None:
    from tui_helpers import SlowSession

    app = make_app(tmp_path / "chats.db", tiny_folder, session_factory=lambda loaded, ctx: SlowSession(loaded, ctx))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        prompt = app.chat.prompt
        prompt.focus()
        prompt.load_text("Count")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.streaming is not None and "word1" in app.chat.streaming.text,
                       timeout=10, what="some words")
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.chat.streaming is None, what="the answer to stop")
        stored = app.store.load(app.chat.conversation.id)
        md = app.chat.export("markdown")
        js = app.chat.export("json")
    assert stored is not None and stored.messages[-1].finish_reason == "cancelled"
    assert md is not None and "*(stopped)*" in md.read_text()
    assert js is not None and json.loads(js.read_text())["messages"][-1]["finish_reason"] == "cancelled"
