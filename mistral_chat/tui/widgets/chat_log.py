"""The conversation's messages, scrolled; it follows a streaming answer unless the user scrolls up."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Static

from mistral_chat.chat.conversation import Conversation, Message
from mistral_chat.chat.templates import Role
from mistral_chat.tui.widgets.message_view import MessageView
from mistral_chat.tui.widgets.tool_call_view import ToolCallView
from mistral_chat.tui.widgets.tool_result_view import ToolResultView

EMPTY_HINT = "Type a message below and press Enter. F1 lists the keys; Ctrl+P opens the command palette."


def view_for(message: Message) -> MessageView:
    """The widget that shows a stored message: text, tool calls or a tool result."""
    if message.tool_calls:
        return ToolCallView(message.content, message.tool_calls, message.id)
    if message.role == "tool":
        return ToolResultView(message.content, message.name, message.tool_call_id, message.id)
    return MessageView(message.role, message.content, message.id)


class ChatLog(VerticalScroll):
    """A column of MessageViews. Follows new text while the view is at the bottom; scrolling up stops that."""

    @property
    def at_end(self) -> bool:
        return self.scroll_y >= self.max_scroll_y - 1

    def follow(self) -> None:
        """Scroll to the end once the new content is laid out."""
        self.call_after_refresh(self.scroll_end, animate=False, immediate=True)

    async def show(self, conversation: Conversation | None, skip_message_id: int = 0) -> None:
        """Replace the content with `conversation`'s messages (all but `skip_message_id`)."""
        await self.remove_children()
        views = [view_for(m) for m in (conversation.messages if conversation else []) if m.id != skip_message_id]
        if views:
            await self.mount_all(views)
        else:
            await self.mount(Static(EMPTY_HINT, classes="empty-hint", markup=False))
        self.follow()

    async def add(self, role: Role, text: str, message_id: int = 0, note: str = "") -> MessageView:
        return await self.add_view(MessageView(role, text, message_id, note))

    async def add_view(self, view: MessageView) -> MessageView:
        for hint in self.query(".empty-hint"):
            await hint.remove()
        await self.mount(view)
        self.follow()
        return view

    @property
    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))

    def last_view(self, role: Role | None = None) -> MessageView | None:
        for view in reversed(self.views):
            if role is None or view.role == role:
                return view
        return None
