"""The chat screen's part for answers as they stream: tokens taken from the app's TokenBuffer on a timer, shown
at the pace's rate (tui/streaming.py), counted in the status bar a few times a second, saved at least once a
second, and the end of each answer (GenerationDone) or any other engine event (load progress, model ready,
errors).
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

from mistral_chat.chat.store import StoreError
from mistral_chat.service.worker import (EngineEvent, EngineFailed, GenerationDone, GenerationStarted, LoadProgress,
                                        ModelReady, TokenDelta)
from mistral_chat.tui.streaming import STATUS_SECONDS, Streaming, Tokens

if TYPE_CHECKING:
    from mistral_chat.tui.screens.chat import ChatScreen

    _Base = ChatScreen
else:
    _Base = object

SAVE_SECONDS = 1.0
NOTES = {"cancelled": "(stopped)", "error": "(error)", "length": ""}


class AnswersPart(_Base):
    """Mixed into ChatScreen: the streaming answer and the engine's events."""

    def take_tokens(self) -> None:
        """Move the tokens gathered in the engine's thread into the streaming answer (others are dropped)."""
        for tokens in self.chat_app.tokens.take():
            self.receive_tokens(tokens)

    def receive_tokens(self, tokens: Tokens) -> None:
        streaming = self.streaming
        if streaming is not None and tokens.request_id == streaming.request_id:
            streaming.receive(tokens)

    async def flush_stream(self) -> None:
        """The timer's tick while an answer streams: take the tokens; when the pace says so, show what arrived and
        count it in the status bar (one frame); in between, count it in the status bar alone every STATUS_SECONDS;
        save now and then."""
        self.take_tokens()
        streaming = self.streaming
        if streaming is None:
            return
        now = time.monotonic()
        if self.chat_app.flush_pace.due(now):
            if streaming.pending and streaming.view is not None and streaming.view.is_mounted:
                fragment, streaming.pending = streaming.pending, ""
                await streaming.view.append(fragment)
                self.chat_log.stream_grew()
            self.count_live(streaming, now)
        elif now - streaming.counted_at >= STATUS_SECONDS:
            self.count_live(streaming, now)
        if now - streaming.saved_at >= SAVE_SECONDS:
            self.save_answer(streaming)

    def count_live(self, streaming: Streaming, now: float) -> None:
        """The answer's tokens so far and their speed in the status bar (a one-line repaint, no layout)."""
        streaming.counted_at = now
        if streaming.tokens != self.status.info.generated_tokens:
            first, rate = streaming.live_figures(now)
            self.status.update_info(generated_tokens=streaming.tokens, time_to_first_token=first,
                                    tokens_per_second=rate)

    def save_answer(self, streaming: Streaming, keep_empty: bool = False) -> None:
        """Write the answer so far (creating its row on the first write); a refused write is said, not raised."""
        streaming.saved_at = time.monotonic()
        if streaming.text == streaming.saved_text and (streaming.message_id or not keep_empty):
            return
        store = self.chat_app.store
        try:
            if streaming.message_id == 0:
                if store.load(streaming.conversation_id) is None:  # deleted meanwhile
                    return
                streaming.message_id = store.add_message(streaming.conversation_id, "assistant", streaming.text).id
            else:
                store.update_message(streaming.message_id, streaming.text)
        except (sqlite3.Error, StoreError) as exc:
            streaming.saved_text = streaming.text  # try again once more text comes
            self.write_failed("save the answer", exc)
            return
        streaming.saved_text = streaming.text

    def save_finish_reason(self, message_id: int, reason: str) -> None:
        """Record why the answer ended (the exports mark a stopped one); a refused write is said, not raised."""
        try:
            self.chat_app.store.set_finish_reason(message_id, reason)
        except (sqlite3.Error, StoreError) as exc:
            self.write_failed("save how the answer ended", exc)

    def save_now(self) -> None:
        """Save the streaming answer as it is (called on quit)."""
        if self.streaming is not None:
            self.save_answer(self.streaming)

    async def handle_engine_event(self, event: EngineEvent) -> None:
        self.take_tokens()  # the tokens before this event come first
        streaming = self.streaming
        if isinstance(event, TokenDelta):  # the app gathers these in its TokenBuffer; a direct one still counts
            self.receive_tokens(Tokens(event.request_id, event.conversation_id, event.text, 1))
        elif isinstance(event, GenerationStarted):
            if streaming is not None and event.request_id == streaming.request_id:
                self.status.update_info(context_used=event.prompt_tokens, context_length=event.context_length,
                                        trimmed_messages=event.dropped_messages, context_estimated=False)
                if streaming.tools and not event.tools_used:
                    self.notify("This model has no function calling (its tokenizer has no tool tokens): it answers "
                                "without the chat's tools.", title="Tools", severity="warning")
                if event.dropped_messages and event.conversation_id not in self._trim_warned:
                    self._trim_warned.add(event.conversation_id)
                    self.notify(f"The chat is longer than the model's context: the {event.dropped_messages} oldest "
                                "messages are left out of the prompt (the system prompt stays).", severity="warning")
        elif isinstance(event, GenerationDone):
            if streaming is not None and event.request_id == streaming.request_id:
                await self._finish(streaming, event)
        elif isinstance(event, EngineFailed):
            self.notify(event.message, title="Model error", severity="error", timeout=10, markup=False)
            if event.during == "load":
                self.status.update_info(loading="", model=f"{self.status.info.model} (failed to load)")
        elif isinstance(event, LoadProgress):
            percent = 100 * event.done // max(event.total, 1)
            self.status.update_info(loading=f"loading {percent}%")
        elif isinstance(event, ModelReady):
            self.status.update_info(model=event.name, device=event.device, dtype=event.dtype, loading="",
                                    context_length=event.context_length, time_to_first_token=None,
                                    tokens_per_second=None, generated_tokens=None)

    async def _finish(self, streaming: Streaming, event: GenerationDone) -> None:
        self._flush_timer.pause()
        self.streaming = None
        self.prompt.cursor_blink = True
        self.chat_log.stream_ended()
        streaming.text = event.text
        reason = event.stats.finish_reason
        if event.tool_call_error:
            self.notify(f"{event.tool_call_error}; it is shown as a plain answer", title="Unreadable tool call",
                        severity="warning", timeout=10, markup=False)
        if event.tool_calls:
            await self._finish_with_calls(streaming, event)
        elif streaming.text or reason == "stop":
            self.save_answer(streaming, keep_empty=True)
        if streaming.message_id and reason:
            self.save_finish_reason(streaming.message_id, reason)
        view = streaming.view
        if not event.tool_calls and view is not None and view.is_mounted:
            if not streaming.text and reason in ("cancelled", "error"):
                await view.remove()
            else:
                await view.finish(streaming.text)
                view.message_id = streaming.message_id
                view.set_note(NOTES.get(reason, ""))
        stats = event.stats
        self.status.update_info(generating=False, time_to_first_token=stats.time_to_first_token or None,
                                tokens_per_second=stats.tokens_per_second or None,
                                generated_tokens=stats.generated_tokens or streaming.tokens,
                                context_used=stats.prompt_tokens + stats.generated_tokens, context_estimated=False)
        if self.conversation is not None and self.conversation.id == streaming.conversation_id:
            reloaded = self.chat_app.store.load(streaming.conversation_id)
            if reloaded is not None:
                self.conversation = reloaded
                self.conversation.title = reloaded.title
                pending = reloaded.pending_tool_calls()
                if event.tool_calls and pending:
                    self._begin_tool_result(pending[0])
        else:
            self.let_go(streaming.conversation_id)  # the answer of a chat this window left meanwhile
