"""Every key binding of the app, grouped by where it works."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

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


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="help"):
            yield Label("Keys  (Escape closes)", classes="title")
            table: DataTable[str] = DataTable(cursor_type="row", zebra_stripes=True)
            table.add_columns("Where", "Key", "Action")
            for row in KEYS:
                table.add_row(*row)
            yield table

    def action_close(self) -> None:
        self.dismiss(None)
