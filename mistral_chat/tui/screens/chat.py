"""The main screen: chat list, conversation, prompt and status bar; every conversation action lives here.

Streaming: tokens arrive as engine messages and are only buffered; a 50 ms timer appends the buffer to the
answer's Markdown widget (which parses just the new tail) and, at least once a second, saves the answer so far.

Tools: a chat with a tools file offers its functions to the model. An answer that calls some is shown as a
ToolCallView and saved with its calls; the prompt then asks for each call's result (Ctrl+T, or r on the call,
starts that again after Escape), saves it as a "tool" message, and once every call has one the model goes on.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Footer, Input

from mistral_chat.chat.conversation import DEFAULT_TITLE, Conversation, title_from
from mistral_chat.chat.tools import Tool, ToolCall, ToolsFileError, load_tools
from mistral_chat.service.worker import (EngineEvent, EngineFailed, GenerationDone, GenerationStarted, LoadProgress,
                                        ModelReady, TokenDelta)
from mistral_chat.paths import app_home
from mistral_chat.tui.screens.confirm import ConfirmScreen
from mistral_chat.tui.screens.model_picker import ModelPickerScreen
from mistral_chat.tui.screens.settings import ChatSettings, SettingsScreen
from mistral_chat.tui.screens.text_prompt import TextPromptScreen
from mistral_chat.tui.widgets.chat_log import ChatLog
from mistral_chat.tui.widgets.message_view import MessageView, code_blocks
from mistral_chat.tui.widgets.prompt_input import PromptInput
from mistral_chat.tui.widgets.sidebar import Sidebar
from mistral_chat.tui.widgets.tool_call_view import ToolCallView
from mistral_chat.tui.widgets.tool_result_view import ToolResultView
from mistral_chat.tui.widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from mistral_chat.tui.app import MistralChatApp

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.05
SAVE_SECONDS = 1.0
NOTES = {"cancelled": "(stopped)", "error": "(error)", "length": ""}


@dataclass
class Streaming:
    """The answer being generated: where it goes, what arrived, what is shown and what is saved."""

    request_id: int
    conversation_id: int
    view: MessageView | None
    text: str = ""
    pending: str = ""  # arrived but not yet shown
    message_id: int = 0  # its row once saved
    saved_text: str = ""
    saved_at: float = field(default_factory=time.monotonic)
    tools: bool = False  # the request offered tools


class ChatScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+l", "edit_last", "Edit last"),
        Binding("f3", "copy_last_answer", "Copy answer", show=False),
        Binding("f2", "rename_chat", "Rename", show=False),
        Binding("f8", "delete_chat", "Delete chat", show=False),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+o", "pick_model", "Model"),
        Binding("ctrl+b", "toggle_sidebar", "Chats", show=False),
        Binding("ctrl+f", "search", "Search", show=False),
        Binding("ctrl+t", "tool_result", "Tool result", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.conversation: Conversation | None = None
        self.streaming: Streaming | None = None
        self.editing_message_id: int | None = None
        self.answering_call: ToolCall | None = None  # the prompt takes this call's result
        self._trim_warned: set[int] = set()

    @property
    def chat_app(self) -> "MistralChatApp":
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield Sidebar(id="sidebar")
            with Vertical(id="chat-pane"):
                yield ChatLog(id="chat-log")
                yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def chat_log(self) -> ChatLog:
        return self.query_one(ChatLog)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def sidebar(self) -> Sidebar:
        return self.query_one(Sidebar)

    async def on_mount(self) -> None:
        self._flush_timer = self.set_interval(FLUSH_SECONDS, self.flush_stream, pause=True)
        if self.chat_app.model_state == "loading":
            self.status.update_info(model=self.chat_app.model_name, loading="loading…")
        recent = self.chat_app.store.list_conversations()
        await self.open_conversation(recent[0].id if recent else None)
        self.prompt.focus()

    # ---- conversations ---------------------------------------------------------------------------------------

    def _new_conversation(self) -> Conversation:
        options = self.chat_app.options
        return self.chat_app.store.create_conversation(system_prompt=options.system_prompt,
                                                       settings=options.sampling,
                                                       tools_path=options.tools_path)

    async def open_conversation(self, conversation_id: int | None) -> None:
        store = self.chat_app.store
        conversation = store.load(conversation_id) if conversation_id is not None else None
        if conversation is None:
            conversation = self._new_conversation()
        self.conversation = conversation
        self.editing_message_id = None
        self._end_tool_result()
        live = self.streaming if self.streaming and self.streaming.conversation_id == conversation.id else None
        await self.chat_log.show(conversation, skip_message_id=live.message_id if live else 0)
        if self.streaming is not None:
            self.streaming.view = None
        if live is not None:
            live.view = await self.chat_log.add("assistant", live.text, live.message_id, note="…")
            live.pending = ""
        self.chat_log.border_title = Content(conversation.title)
        self.status.update_info(context_used=0, trimmed_messages=0)
        await self.refresh_sidebar()
        pending = conversation.pending_tool_calls() if live is None else []
        if pending:  # a chat left waiting for a tool's result asks for it again
            self._begin_tool_result(pending[0])

    async def refresh_sidebar(self) -> None:
        store = self.chat_app.store
        await self.sidebar.show(store.list_conversations(self.sidebar.search_text),
                                self.conversation.id if self.conversation else None)

    async def on_sidebar_selected(self, event: Sidebar.Selected) -> None:
        if self.conversation is None or event.conversation_id != self.conversation.id:
            await self.open_conversation(event.conversation_id)
        self.prompt.focus()

    async def on_sidebar_search_changed(self, event: Sidebar.SearchChanged) -> None:
        await self.refresh_sidebar()

    async def on_sidebar_delete_requested(self, event: Sidebar.DeleteRequested) -> None:
        self._confirm_delete(event.conversation_id)

    async def action_new_chat(self) -> None:
        if self.conversation is not None and not self.conversation.messages:
            self.prompt.focus()
            return
        await self.open_conversation(None)
        self.prompt.focus()

    def action_rename_chat(self) -> None:
        conversation = self.conversation
        if conversation is None:
            return

        async def rename(title: str | None) -> None:
            if title:
                self.chat_app.store.rename(conversation.id, title)
                conversation.title = title
                self.chat_log.border_title = Content(title)
                await self.refresh_sidebar()

        self.app.push_screen(TextPromptScreen("Rename the chat", conversation.title), rename)

    def action_delete_chat(self) -> None:
        if self.conversation is not None:
            self._confirm_delete(self.conversation.id)

    def _confirm_delete(self, conversation_id: int) -> None:
        store = self.chat_app.store
        found = store.load(conversation_id)
        if found is None:
            return

        async def delete(yes: bool | None) -> None:
            if not yes:
                return
            if self.streaming is not None and self.streaming.conversation_id == conversation_id:
                self.chat_app.engine.cancel(self.streaming.request_id)
            store.delete(conversation_id)
            if self.conversation is not None and self.conversation.id == conversation_id:
                remaining = store.list_conversations()
                await self.open_conversation(remaining[0].id if remaining else None)
            else:
                await self.refresh_sidebar()
            self.notify(f"Deleted “{found.title}”", markup=False)

        self.app.push_screen(ConfirmScreen(f"Delete the chat “{found.title}” and its {len(found.messages)} "
                                           "messages?"), delete)

    def action_toggle_sidebar(self) -> None:
        self.sidebar.display = not self.sidebar.display
        if not self.sidebar.display:
            self.prompt.focus()

    def action_search(self) -> None:
        self.sidebar.display = True
        self.sidebar.query_one("#search", Input).focus()

    def action_settings(self) -> None:
        conversation = self.conversation
        if conversation is None:
            return

        def save(result: ChatSettings | None) -> None:
            if result is None:
                return
            conversation.system_prompt, conversation.settings = result.system_prompt, result.generation
            conversation.tools_path = result.tools_path
            self.chat_app.store.update_settings(conversation.id, result.system_prompt, result.generation,
                                                result.tools_path)
            self.notify("Settings saved for this chat")

        current = ChatSettings(conversation.system_prompt, conversation.settings, conversation.tools_path)
        self.app.push_screen(SettingsScreen(conversation.title, current), save)

    def action_pick_model(self) -> None:
        def chosen(choice: object) -> None:
            if choice is not None:
                self.chat_app.load_model(choice.path, choice.name)  # type: ignore[attr-defined]

        self.app.push_screen(ModelPickerScreen(), chosen)

    # ---- sending and answers ---------------------------------------------------------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        if self.answering_call is not None:
            await self.send_tool_result(event.text)
        else:
            await self.send(event.text)

    async def send(self, text: str) -> None:
        if self.streaming is not None:
            self.notify("An answer is still coming: press Escape to stop it first", severity="warning")
            return
        store = self.chat_app.store
        if self.conversation is None:
            self.conversation = self._new_conversation()
        conversation = self.conversation
        pending = conversation.pending_tool_calls()
        if pending and self.editing_message_id is None:
            self.notify(f"The model waits for the result of {pending[0].name}: press Ctrl+T to paste it, or Ctrl+R "
                        "for another answer", severity="warning", markup=False)
            return
        if self.editing_message_id is not None:
            store.delete_messages_from(conversation.id, self.editing_message_id)
            self.editing_message_id = None
            await self.open_conversation(conversation.id)
            conversation = self.conversation
            assert conversation is not None
        message = store.add_message(conversation.id, "user", text)  # saved before anything is generated
        conversation.messages.append(message)
        if conversation.title == DEFAULT_TITLE and sum(m.role == "user" for m in conversation.messages) == 1:
            conversation.title = title_from(text)
            store.rename(conversation.id, conversation.title)
            self.chat_log.border_title = Content(conversation.title)
        self.prompt.clear()
        await self.chat_log.add("user", text, message.id)
        await self.refresh_sidebar()
        await self.start_answer()

    # ---- tool calls and their results -------------------------------------------------------------------------

    def action_tool_result(self) -> None:
        """Paste the result of the first call of the last answer that has none yet."""
        pending = self.conversation.pending_tool_calls() if self.conversation else []
        if not pending:
            self.notify("No tool call waits for a result", severity="warning")
            return
        self._begin_tool_result(pending[0])

    def on_tool_call_view_answer_requested(self, event: ToolCallView.AnswerRequested) -> None:
        pending = self.conversation.pending_tool_calls() if self.conversation else []
        waiting = [call for call in pending if call in event.view.calls]
        if not waiting:
            self.notify("Every call of this answer has its result already", severity="warning")
            return
        self._begin_tool_result(waiting[0])

    def _begin_tool_result(self, call: ToolCall) -> None:
        if self.editing_message_id is not None:
            self._end_edit()
        self.answering_call = call
        self.prompt.border_title = Content(f"Tool result for {call.name} (Enter sends, Escape cancels)")
        self.prompt.placeholder = f"Paste what {call.name} returned"
        self.prompt.add_class("tool-result")
        self.prompt.focus()

    def _end_tool_result(self) -> None:
        if self.answering_call is None:
            return
        self.answering_call = None
        self.prompt.border_title = None
        self.prompt.placeholder = PromptInput.PLACEHOLDER
        self.prompt.remove_class("tool-result")

    async def send_tool_result(self, text: str) -> None:
        """Save `text` as the result of the call being answered; the model goes on once every call has one."""
        call, conversation = self.answering_call, self.conversation
        if self.streaming is not None:
            self.notify("An answer is still coming: press Escape to stop it first", severity="warning")
            return
        if call is None or conversation is None or call not in conversation.pending_tool_calls():
            self._end_tool_result()
            return
        message = self.chat_app.store.add_message(conversation.id, "tool", text, tool_call_id=call.id,
                                                  name=call.name)
        conversation.messages.append(message)
        self._end_tool_result()
        self.prompt.clear()
        await self.chat_log.add_view(ToolResultView(text, call.name, call.id, message.id))
        pending = conversation.pending_tool_calls()
        if pending:
            self._begin_tool_result(pending[0])
        else:
            await self.start_answer()

    def _tools(self, conversation: Conversation) -> list[Tool] | None:
        """The chat's tools (none without a tools file); None, after saying why, when the file cannot be read."""
        if not conversation.tools_path:
            return []
        try:
            return load_tools(conversation.tools_path)
        except ToolsFileError as exc:
            self.notify(f"{exc}: fix it in the settings (Ctrl+S)", title="Tools", severity="error", markup=False)
            return None

    async def start_answer(self) -> None:
        conversation = self.conversation
        if conversation is None or not conversation.messages or conversation.messages[-1].role not in ("user", "tool"):
            return
        if conversation.pending_tool_calls():
            self.action_tool_result()
            return
        if self.chat_app.model_state in ("none", "failed"):
            self.notify("No model is loaded: press Ctrl+O to pick one, then Ctrl+R to get the answer",
                        severity="warning")
            return
        params = conversation.settings  # checked when made (settings screen, store)
        tools = self._tools(conversation)
        if tools is None:
            return
        view = await self.chat_log.add("assistant", "", note="…")  # before any event of the answer can arrive
        request_id = self.chat_app.engine.generate(conversation.id, conversation.chat_messages(), params, tools)
        self.streaming = Streaming(request_id, conversation.id, view, tools=bool(tools))
        self.status.update_info(generating=True)
        self._flush_timer.resume()

    async def flush_stream(self) -> None:
        streaming = self.streaming
        if streaming is None:
            return
        if streaming.pending and streaming.view is not None and streaming.view.is_mounted:
            fragment, streaming.pending = streaming.pending, ""
            await streaming.view.append(fragment)
            self.chat_log.follow()
        if time.monotonic() - streaming.saved_at >= SAVE_SECONDS:
            self.save_answer(streaming)

    def save_answer(self, streaming: Streaming, keep_empty: bool = False) -> None:
        """Write the answer so far (creating its row on the first write)."""
        streaming.saved_at = time.monotonic()
        if streaming.text == streaming.saved_text and (streaming.message_id or not keep_empty):
            return
        store = self.chat_app.store
        if streaming.message_id == 0:
            if store.load(streaming.conversation_id) is None:  # deleted meanwhile
                return
            streaming.message_id = store.add_message(streaming.conversation_id, "assistant", streaming.text).id
        else:
            store.update_message(streaming.message_id, streaming.text)
        streaming.saved_text = streaming.text

    def save_now(self) -> None:
        """Save the streaming answer as it is (called on quit)."""
        if self.streaming is not None:
            self.save_answer(self.streaming)

    async def handle_engine_event(self, event: EngineEvent) -> None:
        streaming = self.streaming
        if isinstance(event, TokenDelta):
            if streaming is not None and event.request_id == streaming.request_id:
                streaming.text += event.text
                streaming.pending += event.text
        elif isinstance(event, GenerationStarted):
            if streaming is not None and event.request_id == streaming.request_id:
                self.status.update_info(context_used=event.prompt_tokens, context_length=event.context_length,
                                        trimmed_messages=event.dropped_messages)
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
                                    context_length=event.context_length)

    async def _finish(self, streaming: Streaming, event: GenerationDone) -> None:
        self._flush_timer.pause()
        self.streaming = None
        streaming.text = event.text
        reason = event.stats.finish_reason
        if event.tool_call_error:
            self.notify(f"{event.tool_call_error}; it is shown as a plain answer", title="Unreadable tool call",
                        severity="warning", timeout=10, markup=False)
        if event.tool_calls:
            await self._finish_with_calls(streaming, event)
        elif streaming.text or reason == "stop":
            self.save_answer(streaming, keep_empty=True)
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
                                context_used=stats.prompt_tokens + stats.generated_tokens)
        if self.conversation is not None and self.conversation.id == streaming.conversation_id:
            reloaded = self.chat_app.store.load(streaming.conversation_id)
            if reloaded is not None:
                self.conversation = reloaded
                self.conversation.title = reloaded.title
                pending = reloaded.pending_tool_calls()
                if event.tool_calls and pending:
                    self._begin_tool_result(pending[0])

    async def _finish_with_calls(self, streaming: Streaming, event: GenerationDone) -> None:
        """Save the answer with its calls, and show them in place of the streamed text."""
        store = self.chat_app.store
        if streaming.message_id:
            store.update_message(streaming.message_id, event.text, event.tool_calls)
        elif store.load(streaming.conversation_id) is not None:
            streaming.message_id = store.add_message(streaming.conversation_id, "assistant", event.text,
                                                     tool_calls=event.tool_calls).id
        streaming.saved_text = event.text
        names = ", ".join(dict.fromkeys(call.name for call in event.tool_calls))
        if streaming.view is not None and streaming.view.is_mounted:
            await streaming.view.finish()
            await streaming.view.remove()
            await self.chat_log.add_view(ToolCallView(event.text, event.tool_calls, streaming.message_id))
        self.notify(f"The model calls {names}: paste each result in the prompt (Enter sends it)", title="Tool call",
                    markup=False)

    def action_stop(self) -> None:
        if self.streaming is not None:
            self.chat_app.engine.cancel(self.streaming.request_id)
        elif self.answering_call is not None:
            self._end_tool_result()
            self.notify("Tool result cancelled: Ctrl+T pastes it later")
        elif self.editing_message_id is not None:
            self._end_edit()
            self.prompt.clear()
            self.notify("Edit cancelled")

    def _end_edit(self) -> None:
        for view in self.chat_log.views:
            if view.message_id == self.editing_message_id:
                view.set_note("")
        self.editing_message_id = None

    async def action_regenerate(self) -> None:
        conversation = self.conversation
        if self.streaming is not None:
            self.notify("An answer is still coming: press Escape to stop it first", severity="warning")
            return
        if conversation is None or not conversation.messages:
            self.notify("Nothing to regenerate yet", severity="warning")
            return
        last = conversation.messages[-1]
        if last.role == "assistant":
            self._end_tool_result()
            self.chat_app.store.delete_messages_from(conversation.id, last.id)
            conversation.messages.pop()
            view = self.chat_log.last_view()
            if view is not None and view.role == "assistant":
                await view.remove()
        await self.start_answer()

    def action_edit_last(self) -> None:
        conversation = self.conversation
        if self.streaming is not None:
            self.notify("An answer is still coming: press Escape to stop it first", severity="warning")
            return
        last_user = conversation.last("user") if conversation else None
        if last_user is None:
            self.notify("No message of yours to edit yet", severity="warning")
            return
        self._end_tool_result()
        self.editing_message_id = last_user.id
        for view in self.chat_log.views:
            if view.message_id == last_user.id:
                view.set_note("(editing: Enter resends, Escape cancels)")
        self.prompt.set_text(last_user.content)
        self.prompt.focus()

    # ---- copy and export -------------------------------------------------------------------------------------

    def last_answer(self) -> str | None:
        if self.conversation is None:
            return None
        message = self.conversation.last("assistant")
        return message.content if message else None

    def action_copy_last_answer(self) -> None:
        answer = self.last_answer()
        if not answer:
            self.notify("No answer to copy yet", severity="warning")
            return
        self.app.copy_to_clipboard(answer)
        self.notify("Answer copied to the clipboard")

    def copy_code_block(self, index: int) -> None:
        blocks = code_blocks(self.last_answer() or "")
        if index < len(blocks):
            self.app.copy_to_clipboard(blocks[index])
            self.notify(f"Code block {index + 1} copied to the clipboard")

    def export(self, kind: str) -> Path | None:
        conversation = self.chat_app.store.load(self.conversation.id) if self.conversation else None
        if conversation is None:
            return None
        folder = app_home() / "exports"
        folder.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^\w-]+", "-", conversation.title.lower()).strip("-")[:40] or "chat"
        path = folder / f"{conversation.id}-{slug}.{'md' if kind == 'markdown' else 'json'}"
        path.write_text(conversation.to_markdown() if kind == "markdown" else conversation.to_json(),
                        encoding="utf-8")
        self.notify(f"Exported to {path}", markup=False)
        return path
