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

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - VerticalScroll's own arguments
        super().__init__(*args, **kwargs)
        # Whether new text scrolls the view. Only a scroll changes it, never growing content, so text that
        # arrives before the last follow has been laid out does not stop the view following.
        self.following = True

    @property
    def at_end(self) -> bool:
        return self.scroll_y >= self.max_scroll_y - 1

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        self.following = self.at_end

    def follow(self, force: bool = False) -> None:
        """Scroll to the end once the new content is laid out, unless the user scrolled up since (or `force`)."""
        if force:
            self.following = True
        self.call_after_refresh(self._scroll_end_if_following)

    def _scroll_end_if_following(self) -> None:
        if self.following:
            self.scroll_end(animate=False, immediate=True)

    # While an answer streams, the log is anchored (Textual's anchor) once it overflows: the layout pass that
    # places the grown answer keeps the end in view, where a scroll after it cost a second layout and paint per
    # update. Not before it overflows (an anchored log shorter than its height sits at the bottom), and not
    # after the answer (a shorter chat shown next would too).

    def stream_grew(self) -> None:
        """New text came into the streaming answer: keep the end in view unless the user scrolled up."""
        if not self.is_anchored:
            self.call_after_refresh(self._anchor_if_following)

    def _anchor_if_following(self) -> None:
        if self.following and not self.is_anchored:
            if self.max_scroll_y > 0:
                self.anchor()  # scrolls to the end now, and from now on in each layout pass
            else:
                self.scroll_end(animate=False, immediate=True)

    def stream_ended(self) -> None:
        if self.is_anchored:
            self.anchor(False)

    async def show(self, conversation: Conversation | None, skip_message_id: int = 0) -> None:
        """Replace the content with `conversation`'s messages (all but `skip_message_id`)."""
        self.stream_ended()
        await self.remove_children()
        views = [view_for(m) for m in (conversation.messages if conversation else []) if m.id != skip_message_id]
        if views:
            await self.mount_all(views)
        else:
            await self.mount(Static(EMPTY_HINT, classes="empty-hint", markup=False))
        self.follow(force=True)

    async def add(self, role: Role, text: str, message_id: int = 0, note: str = "") -> MessageView:
        return await self.add_view(MessageView(role, text, message_id, note))

    async def add_view(self, view: MessageView) -> MessageView:
        for hint in self.query(".empty-hint"):
            await hint.remove()
        await self.mount(view)
        self.follow(force=True)
        return view

    @property
    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))

    def last_view(self, role: Role | None = None) -> MessageView | None:
        for view in reversed(self.views):
            if role is None or view.role == role:
                return view
        return None
