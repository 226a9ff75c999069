"""An answer that calls tools: each call's function name and its arguments as indented JSON (data, never markup).
Focus it and press r to paste a call's result."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.message import Message
from textual.widgets import Label, Static

from mistral_chat.chat.conversation import format_arguments
from mistral_chat.chat.tools import ToolCall
from mistral_chat.tui.safe_text import displayable
from mistral_chat.tui.widgets.message_view import MessageView


def describe_calls(text: str, calls: tuple[ToolCall, ...]) -> str:
    """The plain text of an answer with calls (what `c` copies)."""
    parts = [text] if text else []
    parts += [f"{call.name} (call {call.id})\n{format_arguments(call.arguments)}" for call in calls]
    return "\n\n".join(parts)


class ToolCallView(MessageView):
    """The assistant's tool calls. `r` asks for the result of the first call still without one."""

    BINDINGS = [Binding("r", "answer_call", "Paste tool result")]

    @dataclass
    class AnswerRequested(Message):
        """The user wants to paste the result of one of this message's calls."""

        view: "ToolCallView"
        message_id: int

    def __init__(self, text: str, calls: tuple[ToolCall, ...], message_id: int = 0, note: str = "") -> None:
        super().__init__("assistant", describe_calls(text, calls), message_id, note)
        self.add_class("tool-calls")
        self.answer_text = text
        self.calls = calls

    def compose(self) -> ComposeResult:
        yield Label(self._label(), classes="role")
        if self.answer_text:
            yield Static(Content(displayable(self.answer_text)), classes="body")
        for call in self.calls:
            yield Static(Content.assemble(("calls ", "dim"), (call.name, "bold"), (f"  (id {call.id})", "dim")),
                         classes="call-name")
            yield Static(Content(displayable(format_arguments(call.arguments))), classes="call-arguments")

    def _label(self) -> Content:
        return Content(f"Assistant  {self.note}" if self.note else "Assistant")

    def action_answer_call(self) -> None:
        self.post_message(self.AnswerRequested(self, self.message_id))
