"""The chat screen's part for tool calls: showing an answer's calls and taking each call's result in the prompt.

A chat with a tools file offers its functions to the model. An answer that calls some is shown as a ToolCallView
and saved with its calls; the prompt then asks for each call's result (Ctrl+T, or r on the call, starts that
again after Escape), saves it as a "tool" message, and once every call has one the model goes on.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from textual.content import Content

from mistral_chat.chat.conversation import Conversation
from mistral_chat.chat.store import StoreError
from mistral_chat.chat.tools import Tool, ToolCall, ToolsFileError, load_tools
from mistral_chat.service.worker import GenerationDone
from mistral_chat.tui.streaming import Streaming
from mistral_chat.tui.widgets.prompt_input import PromptInput
from mistral_chat.tui.widgets.tool_call_view import ToolCallView
from mistral_chat.tui.widgets.tool_result_view import ToolResultView

if TYPE_CHECKING:
    from mistral_chat.tui.screens.chat import ChatScreen

    _Base = ChatScreen
else:
    _Base = object


class ToolCallsPart(_Base):
    """Mixed into ChatScreen (its bindings stay there): everything about tool calls and their results."""

    answering_call: ToolCall | None

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
        try:
            message = self.chat_app.store.add_message(conversation.id, "tool", text, tool_call_id=call.id,
                                                      name=call.name)
        except (sqlite3.Error, StoreError) as exc:  # the result stays in the prompt
            self.write_failed("save the tool result", exc)
            return
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

    async def _finish_with_calls(self, streaming: Streaming, event: GenerationDone) -> None:
        """Save the answer with its calls, and show them in place of the streamed text."""
        store = self.chat_app.store
        try:
            if streaming.message_id:
                store.update_message(streaming.message_id, event.text, event.tool_calls)
            elif store.load(streaming.conversation_id) is not None:
                streaming.message_id = store.add_message(streaming.conversation_id, "assistant", event.text,
                                                         tool_calls=event.tool_calls).id
        except (sqlite3.Error, StoreError) as exc:
            self.write_failed("save the answer", exc)
        streaming.saved_text = event.text
        names = ", ".join(dict.fromkeys(call.name for call in event.tool_calls))
        view = streaming.view
        if view is not None and view.is_mounted:
            await view.finish()
            await view.remove()
            await self.chat_log.add_view(ToolCallView(event.text, event.tool_calls, streaming.message_id))
        self.notify(f"The model calls {names}: paste each result in the prompt (Enter sends it)", title="Tool call",
                    markup=False)
