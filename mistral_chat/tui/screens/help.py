"""Every key binding of the app, grouped by where it works.

The table is a Rich table in a scrolling Static: its cells wrap at any width (a DataTable cuts them off).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from rich.table import Table
from rich.text import Text
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

KEYS: list[tuple[str, str, str]] = [
    ("Chat", "Enter", "Send the message"),
    ("Chat", "Ctrl+J", "New line in the message (Shift+Enter / Alt+Enter where the terminal reports them)"),
    ("Chat", "Up / Down", "Previous / next sent message (on the first / last line)"),
    ("Chat", "Escape", "Stop the answer (keeps the partial text); cancel an edit"),
    ("Chat", "Ctrl+R", "Regenerate the last answer"),
    ("Chat", "Ctrl+L", "Edit the last message and resend it"),
    ("Chat", "F3", "Copy the last answer"),
    ("Chat", "Ctrl+N", "New chat"),
    ("Chat", "F2", "Rename the chat"),
    ("Chat", "F8", "Delete the chat"),
    ("Chat", "Ctrl+S", "System prompt, generation settings and tools file of the chat"),
    ("Chat", "Ctrl+T", "Paste the result of the model's tool call (Escape cancels)"),
    ("Chat", "Ctrl+O", "Pick a model"),
    ("Chat", "Ctrl+B", "Show / hide the chat list"),
    ("Chat", "Ctrl+F", "Search chats"),
    ("Message (focused)", "c", "Copy the message"),
    ("Message (focused)", "y", "Copy its (last) code block"),
    ("Tool call (focused)", "r", "Paste the result of this call"),
    ("Chat list", "Enter", "Open the chat"),
    ("Chat list", "Delete", "Delete the chat"),
    ("App", "Ctrl+P", "Command palette: every action, themes, export"),
    ("App", "F1", "This help"),
    ("App", "Tab / Shift+Tab", "Move focus"),
    ("App", "Ctrl+Q", "Quit"),
]


def keys_table() -> Table:
    """Where, key and action, each cell wrapping onto more lines when the terminal is narrow."""
    table = Table(box=None, expand=True, pad_edge=False,
                  header_style="bold")
    table.add_column("Where", ratio=3, overflow="fold")
    table.add_column("Key", ratio=3, overflow="fold")
    table.add_column("Action", ratio=9, overflow="fold")
    previous = ""
    for where, key, action in KEYS:
        table.add_row(Text(where if where != previous else ""), Text(key, style="bold"), Text(action))
        previous = where
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="help"):
            yield Label("Keys  (Escape closes)", classes="title")
            with VerticalScroll(id="help-keys", can_focus=True):
                yield Static(keys_table(), id="help-table")

    def on_mount(self) -> None:
        self.query_one("#help-keys").focus()  # Up/Down/PageUp/PageDown scroll a long list

    def action_close(self) -> None:
        self.dismiss(None)
