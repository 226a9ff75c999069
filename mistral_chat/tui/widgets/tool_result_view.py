"""A tool result the user pasted back: which function it answers, and its text (data, never markup)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.content import Content
from textual.widgets import Label, Static

from mistral_chat.tui.safe_text import displayable
from mistral_chat.tui.widgets.message_view import MessageView


class ToolResultView(MessageView):
    """The result of one tool call, shown as plain text (results are often JSON, not Markdown)."""

    def __init__(self, text: str, name: str | None, call_id: str | None, message_id: int = 0) -> None:
        super().__init__("tool", text, message_id)
        self.function_name = name
        self.call_id = call_id

    def compose(self) -> ComposeResult:
        yield Label(self._label(), classes="role")
        yield Static(Content(displayable(self.text)), classes="body")

    def _label(self) -> Content:
        what = self.function_name or self.call_id or "a call"
        label = f"Tool result of {what}"
        return Content(f"{label}  {self.note}" if self.note else label)
