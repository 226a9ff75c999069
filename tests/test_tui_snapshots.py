"""Snapshots of the main screens (pytest-textual-snapshot): fixed size, fixed content, no timings.

Update them after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

from pathlib import Path

from tui_helpers import isolated_home  # noqa: F401 - autouse fixture
from tui_helpers import close_welcome, make_app, open_settings, wait_for, welcome_shown

from mistral_chat.chat.store import ChatStore

SIZE = (110, 34)
ANSWER = """Here is a function, and text that looks like markup: [INST] [bold]not bold[/bold] [/INST].

```python
def greet(name: str) -> str:
    return f"Hello, {name}!"
```

- it is **pure**
- it has `type hints`
"""


def seeded_app(tmp_path: Path):
    store = ChatStore(tmp_path / "chats.db")
    older = store.create_conversation("Rust lifetimes explained")
    store.add_message(older.id, "user", "What is a lifetime?")
    conversation = store.create_conversation("Python greeting")
    store.add_message(conversation.id, "user", "Write a greeting function in Python")
    store.add_message(conversation.id, "assistant", ANSWER)
    store.close()
    return make_app(tmp_path / "chats.db", None)


async def settle(pilot) -> None:
    await close_welcome(pilot)  # no model in these tests
    pilot.app.chat.prompt.cursor_blink = False
    pilot.app.chat.status.update_info(model="mistral-7b-instruct", device="cuda:0", dtype="bfloat16",
                                      context_used=412, context_estimated=False, context_length=32768,
                                      time_to_first_token=0.085, tokens_per_second=187.3)
    await pilot.pause()


def test_welcome_screen(snap_compare, tmp_path: Path) -> None:
    async def run_before(pilot) -> None:
        await wait_for(pilot, lambda: welcome_shown(pilot.app), what="the welcome screen")
        pilot.app.chat.prompt.cursor_blink = False
        await pilot.pause()

    assert snap_compare(make_app(tmp_path / "chats.db", None), terminal_size=SIZE, run_before=run_before)


def test_chat_screen(snap_compare, tmp_path: Path) -> None:
    assert snap_compare(seeded_app(tmp_path), terminal_size=SIZE, run_before=settle)


def test_chat_screen_light_theme_without_sidebar(snap_compare, tmp_path: Path) -> None:
    async def run_before(pilot) -> None:
        await settle(pilot)
        pilot.app.theme = "mistral-light"
        await pilot.press("ctrl+b")
        await pilot.pause()

    assert snap_compare(seeded_app(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_settings_screen(snap_compare, tmp_path: Path) -> None:
    async def run_before(pilot) -> None:
        await settle(pilot)
        from textual.widgets import TextArea

        for area in (await open_settings(pilot)).query(TextArea):
            area.cursor_blink = False
        await pilot.pause()

    assert snap_compare(seeded_app(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare, tmp_path: Path) -> None:
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(seeded_app(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_tool_call_screen(snap_compare, tmp_path: Path) -> None:
    """An answer that calls a tool (name and indented arguments), the pasted result, the prompt asking for more."""
    from mistral_chat.chat.tools import ToolCall

    store = ChatStore(tmp_path / "chats.db")
    conversation = store.create_conversation("Weather in Paris")
    first = ToolCall("abcDEF123", "get_weather", '{"city": "Paris", "unit": "[bold]celsius[/bold]"}')
    second = ToolCall("xyz987QWE", "get_time", '{"timezone": "Europe/Paris"}')
    store.add_message(conversation.id, "user", "What's the weather and the time in Paris?")
    store.add_message(conversation.id, "assistant", "", tool_calls=(first, second))
    store.add_message(conversation.id, "tool", '{"temperature": 21, "sky": "clear"}', tool_call_id=first.id,
                      name=first.name)
    store.close()

    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("ctrl+t")
        await pilot.pause()

    assert snap_compare(make_app(tmp_path / "chats.db", None), terminal_size=SIZE, run_before=run_before)
