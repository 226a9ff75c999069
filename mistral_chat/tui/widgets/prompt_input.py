"""The multi-line prompt editor: Enter sends, Ctrl+J / Alt+Enter insert a newline, Up/Down walk the history.

Enter is handled in the widget's own key handler, in order with the keys before it: as a priority binding it ran
as soon as the app read it, before the TextArea had taken the keys queued ahead of it, so "hi" + Enter arriving
in one burst (a paste, tmux send-keys, a slow SSH link) sent an empty message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")
HISTORY_LIMIT = 200


def read_alt_enter() -> None:
    """Teach Textual's key reader ESC CR, the Alt+Enter of xterm-style terminals and tmux: it reads it as a
    plain Enter (the Alt is kept only for one-character keys), which sent half-typed messages."""
    try:
        from textual._ansi_sequences import ANSI_SEQUENCES_KEYS
    except ImportError:  # a Textual without that table: Alt+Enter sends, Ctrl+J still adds a line
        return
    ANSI_SEQUENCES_KEYS.setdefault("\x1b\r", (SimpleNamespace(value="alt+enter"),))  # type: ignore[arg-type]


read_alt_enter()


class PromptInput(TextArea):
    """A TextArea that sends on Enter and remembers what was sent."""

    BINDINGS = [
        Binding("enter", "submit", "Send", show=True),  # shown in the footer; _on_key runs it, in key order
        Binding("ctrl+j", "newline", "Newline", show=True),
    ]

    @dataclass
    class Submitted(Message):
        input: "PromptInput"
        text: str

    PLACEHOLDER = "Message (Enter to send, Ctrl+J for a new line)"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, tab_behavior="focus")
        self.sent: list[str] = []
        self._history_index: int | None = None
        self._draft = ""
        self.placeholder = self.PLACEHOLDER

    async def _on_key(self, event: events.Key) -> None:
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.action_submit()
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        self.insert("\n")

    def action_submit(self) -> None:
        text = self.text.strip()
        if not text:
            return
        self.remember(text)
        self.post_message(self.Submitted(self, text))

    def remember(self, text: str) -> None:
        if not self.sent or self.sent[-1] != text:
            self.sent.append(text)
            del self.sent[:-HISTORY_LIMIT]
        self._history_index = None

    def seed_history(self, texts: Iterable[str]) -> None:
        """Start the history with `texts` (the chat's own messages, oldest first), so Up recalls them after a
        restart; what was sent in this run and is not among them comes after."""
        seeded: list[str] = []
        for text in texts:
            if text.strip() and (not seeded or seeded[-1] != text):
                seeded.append(text)
        self.sent = (seeded + [t for t in self.sent if t not in seeded])[-HISTORY_LIMIT:]
        self._history_index = None

    def set_text(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    def action_cursor_up(self, select: bool = False) -> None:
        if select or self.cursor_location[0] > 0 or not self.sent:
            super().action_cursor_up(select)
            return
        if self._history_index is None:
            self._draft = self.text
            self._history_index = len(self.sent)
        if self._history_index > 0:
            self._history_index -= 1
            self.set_text(self.sent[self._history_index])

    def action_cursor_down(self, select: bool = False) -> None:
        last_row = self.document.line_count - 1
        if select or self.cursor_location[0] < last_row or self._history_index is None:
            super().action_cursor_down(select)
            return
        self._history_index += 1
        if self._history_index >= len(self.sent):
            self._history_index = None
            self.set_text(self._draft)
        else:
            self.set_text(self.sent[self._history_index])
