"""The main screen: chat list, conversation, prompt and status bar; every conversation action lives here.

Streaming: tokens gather in the app's TokenBuffer (engine thread); a timer, at most ~30 times a second, appends
what gathered to the answer's Markdown widget (which parses just the new tail), updates the live token count
and speed in the status bar and, at least once a second, saves the answer so far. Tool calls and their results
are handled in chat_tools.py (mixed in), renaming and deleting chats in chat_list.py, exports in tui/export.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Input

from mistral_chat.chat.conversation import DEFAULT_TITLE, Conversation, title_from
from mistral_chat.chat.store import ConversationBusyError, StoreError
from mistral_chat.chat.tools import ToolCall
from mistral_chat.errors import MistralChatError
from mistral_chat.paths import app_home
from mistral_chat.tui.clipboard import copy_text
from mistral_chat.tui.export import ExportKind, export_conversation
from mistral_chat.tui.screens.chat_answers import AnswersPart
from mistral_chat.tui.screens.chat_list import ChatListPart
from mistral_chat.tui.screens.chat_tools import ToolCallsPart
from mistral_chat.tui.screens.model_picker import ModelPickerScreen
from mistral_chat.tui.screens.settings import ChatSettings, SettingsScreen
from mistral_chat.tui.safe_text import displayable
from mistral_chat.tui.streaming import FLUSH_SECONDS, Streaming
from mistral_chat.tui.widgets.chat_log import ChatLog
from mistral_chat.tui.widgets.message_view import code_blocks
from mistral_chat.tui.widgets.prompt_input import PromptInput
from mistral_chat.tui.widgets.sidebar import Sidebar
from mistral_chat.tui.widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from mistral_chat.tui.app import MistralChatApp

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # the estimate of a reopened chat's context use, until an answer counts it exactly
CLAIM_RETRY_SECONDS = 0.05  # another window's sidebar may hold a chat's lock for an instant while it looks


class ChatScreen(AnswersPart, ToolCallsPart, ChatListPart, Screen[None]):
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
        self._store_warned = False
        self._early_text = ""  # typed before the prompt had focus ("\n": Enter)

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
        try:
            recent = self.chat_app.store.list_conversations()
            await self.open_conversation(recent[0].id if recent else None)
        except sqlite3.DatabaseError as exc:  # corrupt pages: nothing to show, and nothing is written to it
            self.chat_app.cannot_start_with_database(exc)
            return
        self.prompt.focus()
        self._type_early_keys()

    def on_unmount(self) -> None:
        """The app ends: other windows may write into the chats this one held (the store may live on)."""
        store = self.chat_app.store
        if self.streaming is not None:
            store.release(self.streaming.conversation_id)
        if self.conversation is not None:
            store.release(self.conversation.id)

    def take_early_key(self, event: events.Key) -> bool:
        """A key that came while nothing had focus (typed before the first frame): kept for the prompt, in order.
        True when taken."""
        if event.key == "enter" and self._early_text:
            self._early_text += "\n"  # sent once the prompt is there
        elif event.is_printable and event.character:
            self._early_text += event.character
        else:
            return False
        self.call_after_refresh(self._type_early_keys)
        return True

    def _type_early_keys(self) -> None:
        try:
            prompt = self.prompt
        except NoMatches:  # not composed yet: on_mount types them
            return
        text, self._early_text = self._early_text, ""
        if not text:
            return
        prompt.focus()
        line, sends, rest = text.partition("\n")
        prompt.insert(line)
        if sends:
            prompt.action_submit()
            if rest:
                self._early_text = rest
                self.call_after_refresh(self._type_early_keys)

    # ---- conversations ---------------------------------------------------------------------------------------

    def _new_conversation(self) -> Conversation:
        options = self.chat_app.options
        return self.chat_app.store.create_conversation(system_prompt=options.system_prompt,
                                                       settings=options.sampling,
                                                       tools_path=options.tools_path)

    async def open_conversation(self, conversation_id: int | None) -> None:
        """Show a chat (None: a new one). This window holds the chat it shows (`ChatStore.claim`); a chat another
        mistral-chat window holds is not opened: a new chat is, and a notification says why."""
        store = self.chat_app.store
        previous = self.conversation
        conversation = store.load(conversation_id) if conversation_id is not None else None
        if conversation is not None and not await self._claim(conversation.id):
            self.notify(f"chat {conversation.id} is open in another mistral-chat window; started a new chat",
                        severity="warning", timeout=8, markup=False)
            conversation = None
            if previous is not None and not previous.messages and store.holds(previous.id):
                conversation = store.load(previous.id)  # the empty chat already open is that new chat
        if conversation is None:
            conversation = self._new_conversation()
        self.conversation = conversation
        if previous is not None and previous.id != conversation.id:
            self.let_go(previous.id)
        self.editing_message_id = None
        self._end_tool_result()
        live = self.streaming if self.streaming and self.streaming.conversation_id == conversation.id else None
        await self.chat_log.show(conversation, skip_message_id=live.message_id if live else 0)
        if self.streaming is not None:
            self.streaming.view = None
        if live is not None:
            live.view = await self.chat_log.add("assistant", live.text, live.message_id, note="…")
            live.pending = ""
        self.chat_log.border_title = Content(displayable(conversation.title))
        self.status.update_info(context_used=self._estimated_context(conversation), context_estimated=True,
                                trimmed_messages=0, time_to_first_token=None, tokens_per_second=None,
                                generated_tokens=None)
        self.prompt.seed_history(m.content for m in conversation.messages if m.role == "user")
        await self.refresh_sidebar()
        pending = conversation.pending_tool_calls() if live is None else []
        if pending:  # a chat left waiting for a tool's result asks for it again
            self._begin_tool_result(pending[0])

    async def _claim(self, conversation_id: int) -> bool:
        store = self.chat_app.store
        if store.claim(conversation_id):
            return True
        await asyncio.sleep(CLAIM_RETRY_SECONDS)  # not a sidebar's passing look (see held_elsewhere)
        return store.claim(conversation_id)

    def let_go(self, conversation_id: int) -> None:
        """Let other windows write into a chat this one leaves; one whose answer still streams is let go when the
        answer ends."""
        streaming = self.streaming
        if streaming is not None and streaming.conversation_id == conversation_id:
            return
        if self.conversation is not None and self.conversation.id == conversation_id:
            return
        self.chat_app.store.release(conversation_id)

    @staticmethod
    def _estimated_context(conversation: Conversation) -> int:
        """Roughly the tokens the chat's prompt takes (the exact count comes with the next answer)."""
        chars = len(conversation.system_prompt) + sum(len(m.content) for m in conversation.messages)
        return chars // CHARS_PER_TOKEN

    def write_failed(self, what: str, exc: Exception) -> None:
        """Say (once a run) that the database refused a write; the app goes on with what it shows."""
        log.warning("cannot %s: %s", what, exc)
        if isinstance(exc, ConversationBusyError):  # the database is fine: another window holds the chat
            self.notify(f"Cannot {what}: {exc}", title="Not saved", severity="error", timeout=10, markup=False)
            return
        if self._store_warned:
            self.notify(f"Cannot {what}: {exc}", severity="error", markup=False)
            return
        self._store_warned = True
        self.notify(f"Cannot {what}: {exc}. The conversation database {self.chat_app.store.path} is not "
                    "writable: chats are not saved until it is (check its permissions and the disk).",
                    title="Not saved", severity="error", timeout=15, markup=False)

    async def refresh_sidebar(self) -> None:
        """List the chats again (other windows' new ones too), marking those another window holds."""
        store = self.chat_app.store
        conversations = store.list_conversations(self.sidebar.search_text)
        elsewhere = {c.id for c in conversations if store.held_elsewhere(c.id)}
        await self.sidebar.show(conversations, self.conversation.id if self.conversation else None, elsewhere)

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
            conversation.tools_path = result.tools_path  # used in this window even when not saved
            try:
                self.chat_app.store.update_settings(conversation.id, result.system_prompt, result.generation,
                                                    result.tools_path)
            except (sqlite3.Error, StoreError) as exc:
                self.write_failed("save the settings", exc)
                return
            self.notify("Settings saved for this chat")

        current = ChatSettings(conversation.system_prompt, conversation.settings, conversation.tools_path)
        self.app.push_screen(SettingsScreen(conversation.title, current), save)

    def action_pick_model(self) -> None:
        def chosen(choice: object) -> None:
            if choice is not None:
                self.chat_app.load_model(choice.path, choice.name)  # type: ignore[attr-defined]

        app = self.chat_app
        loaded = app.model_state in ("ready", "loading")
        self.app.push_screen(ModelPickerScreen(app.model_name if loaded else "", app.model_path if loaded else None,
                                               app.model_state), chosen)

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
        try:
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
                self.chat_log.border_title = Content(displayable(conversation.title))
        except (sqlite3.Error, StoreError) as exc:  # the message stays in the prompt
            self.write_failed("save your message", exc)
            return
        self.prompt.clear()
        await self.chat_log.add("user", text, message.id)
        await self.refresh_sidebar()
        await self.start_answer()

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
        self.status.update_info(generating=True, time_to_first_token=None, tokens_per_second=None,
                                generated_tokens=0)
        self.prompt.cursor_blink = False  # each blink repaints the prompt: the cursor holds still while it streams
        self._flush_timer.resume()

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
            try:
                self.chat_app.store.delete_messages_from(conversation.id, last.id)
            except (sqlite3.Error, StoreError) as exc:
                self.write_failed("remove the last answer", exc)
                return
            self._end_tool_result()
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
        copy_text(self, answer, "The last answer")

    def copy_code_block(self, index: int) -> None:
        blocks = code_blocks(self.last_answer() or "")
        if index < len(blocks):
            copy_text(self, blocks[index], f"Code block {index + 1}")

    def export(self, kind: ExportKind) -> Path | None:
        """Write the chat to a file under the app home's exports folder; says where, or why it could not."""
        try:
            conversation = self.chat_app.store.load(self.conversation.id) if self.conversation else None
        except sqlite3.Error as exc:
            self.notify(f"Cannot read the chat to export it: {exc}", severity="error", markup=False)
            return None
        if conversation is None:
            return None
        model = self.status.info.model if self.chat_app.model_state == "ready" else ""
        try:
            path = export_conversation(conversation, kind, app_home() / "exports", model)
        except MistralChatError as exc:
            self.notify(str(exc), title="Export failed", severity="error", timeout=15, markup=False)
            return None
        self.notify(f"Exported to {path}", markup=False)
        return path
