"""A conversation as plain data: its messages, system prompt and sampling settings; Markdown and JSON export."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from mistral_chat.chat.templates import ChatMessage, Role
from mistral_chat.chat.tools import ToolCall
from mistral_chat.engine.options import SamplingParams

DEFAULT_TITLE = "New chat"
# how the Markdown export marks an answer that did not end by itself (the JSON export has its finish_reason)
STOPPED_NOTES = {"cancelled": "*(stopped)*", "error": "*(error)*"}


@dataclass
class Message:
    """One stored message. `id` is the database row (0 until saved). An assistant message may hold tool calls;
    a "tool" message is the result of the call `tool_call_id` to the function `name`."""

    role: Role
    content: str
    id: int = 0
    created_at: float = field(default_factory=time.time)
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    finish_reason: str | None = None  # why an answer ended ("stop", "length", "cancelled"...); None = unknown

    def chat_message(self) -> ChatMessage:
        return ChatMessage(self.role, self.content, tool_calls=self.tool_calls, tool_call_id=self.tool_call_id,
                           name=self.name)


@dataclass
class Conversation:
    """A conversation: its messages in order, its own system prompt and settings."""

    id: int
    title: str = DEFAULT_TITLE
    system_prompt: str = ""
    settings: SamplingParams = field(default_factory=SamplingParams)  # how its answers are sampled
    messages: list[Message] = field(default_factory=list)
    tools_path: str = ""  # a JSON file of functions the model may call ("" = none)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def chat_messages(self) -> list[ChatMessage]:
        """What the model sees: the system prompt (when set) and every non-empty turn."""
        head = [ChatMessage("system", self.system_prompt)] if self.system_prompt.strip() else []
        return head + [m.chat_message() for m in self.messages
                       if m.content or m.tool_calls or m.role in ("user", "tool")]

    def pending_tool_calls(self) -> list[ToolCall]:
        """The calls of the last answer that still wait for a result (only while nothing but results follow it)."""
        answered: set[str] = set()
        for message in reversed(self.messages):
            if message.role == "tool":
                answered.add(message.tool_call_id or "")
            elif message.role == "assistant" and message.tool_calls:
                return [call for call in message.tool_calls if call.id not in answered]
            else:
                return []
        return []

    def tool_call(self, call_id: str | None) -> ToolCall | None:
        for message in self.messages:
            for call in message.tool_calls:
                if call.id == call_id:
                    return call
        return None

    def last(self, role: Role) -> Message | None:
        for message in reversed(self.messages):
            if message.role == role:
                return message
        return None

    def to_markdown(self, model: str = "") -> str:
        """The conversation as Markdown; `model` (the model that answered, when known) goes under the title."""
        lines = [f"# {self.title}", ""]
        if model:
            lines += [f"Model: {model}", ""]
        if self.system_prompt.strip():
            lines += ["**System:**", "", self.system_prompt, ""]
        for message in self.messages:
            if message.role == "tool":
                lines += [f"**Tool result ({message.name or message.tool_call_id}):**", "", message.content, ""]
                continue
            lines += [f"**{message.role.capitalize()}:**", ""]
            lines += [message.content, ""] if message.content else []
            if message.finish_reason in STOPPED_NOTES:
                lines += [STOPPED_NOTES[message.finish_reason], ""]
            for call in message.tool_calls:
                lines += [f"Calls `{call.name}`:", "", "```json", format_arguments(call.arguments), "```", ""]
        return "\n".join(lines).rstrip() + "\n"

    def to_json(self, model: str = "") -> str:
        """The conversation as JSON: every field, and `model` (the model that answered; "" when unknown). Each
        message has its `finish_reason` ("cancelled" for an answer stopped with Escape; null when unknown)."""
        data = {"model": model, **asdict(self)}
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def format_arguments(arguments: str) -> str:
    """A call's JSON arguments, indented for reading (as given when they are not JSON)."""
    try:
        return json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except (ValueError, TypeError):
        return arguments


def title_from(text: str, limit: int = 40) -> str:
    """A conversation title from its first user message: the first line, cut at a word."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or DEFAULT_TITLE
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] or line[:limit]
    return cut + "…"
