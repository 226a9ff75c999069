"""A conversation as plain data: its messages, system prompt and generation settings; Markdown and JSON export."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mistral_chat.chat.templates import ChatMessage, Role
from mistral_chat.engine.sampling import SamplingParams

DEFAULT_TITLE = "New chat"


@dataclass
class GenerationSettings:
    """How a conversation's answers are sampled. Temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 1024
    seed: int | None = None

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters; ValueError when a value is out of range."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens, seed=self.seed)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "GenerationSettings":
        known = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Message:
    """One stored message. `id` is the database row (0 until saved)."""

    role: Role
    content: str
    id: int = 0
    created_at: float = field(default_factory=time.time)

    def chat_message(self) -> ChatMessage:
        return ChatMessage(self.role, self.content)


@dataclass
class Conversation:
    """A conversation: its messages in order, its own system prompt and settings."""

    id: int
    title: str = DEFAULT_TITLE
    system_prompt: str = ""
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    messages: list[Message] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def chat_messages(self) -> list[ChatMessage]:
        """What the model sees: the system prompt (when set) and every non-empty turn."""
        head = [ChatMessage("system", self.system_prompt)] if self.system_prompt.strip() else []
        return head + [m.chat_message() for m in self.messages if m.content or m.role == "user"]

    def last(self, role: Role) -> Message | None:
        for message in reversed(self.messages):
            if message.role == role:
                return message
        return None

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        if self.system_prompt.strip():
            lines += ["**System:**", "", self.system_prompt, ""]
        for message in self.messages:
            lines += [f"**{message.role.capitalize()}:**", "", message.content, ""]
        return "\n".join(lines).rstrip() + "\n"

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def title_from(text: str, limit: int = 40) -> str:
    """A conversation title from its first user message: the first line, cut at a word."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or DEFAULT_TITLE
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] or line[:limit]
    return cut + "…"
