"""Engine events as Textual messages: the worker thread posts them, the event loop handles them."""

from __future__ import annotations

from textual.message import Message

from mistral_chat.service.worker import EngineEvent


class EngineMessage(Message):
    """One event from the engine's worker thread (`post_message` is thread-safe)."""

    def __init__(self, event: EngineEvent) -> None:
        super().__init__()
        self.event = event
