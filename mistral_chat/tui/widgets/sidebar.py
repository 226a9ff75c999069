"""The conversation list: search box and conversations, newest first. Ctrl+B hides it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.widgets import Input, Label, ListItem, ListView

from mistral_chat.chat.conversation import Conversation
from mistral_chat.tui.safe_text import displayable


ELSEWHERE = " (open elsewhere)"


class ConversationItem(ListItem):
    def __init__(self, conversation: Conversation, elsewhere: bool = False) -> None:
        """`elsewhere`: another mistral-chat window holds the chat (it writes into it)."""
        label = Content(displayable(conversation.title))
        if elsewhere:
            label = label + Content.styled(ELSEWHERE, "dim")
        super().__init__(Label(label), id=f"conversation-{conversation.id}")
        self.conversation_id = conversation.id
        self.elsewhere = elsewhere


class Sidebar(Vertical):
    """Search and pick conversations. Enter opens the highlighted one; Delete deletes it."""

    BINDINGS = [
        Binding("delete", "delete_highlighted", "Delete chat"),
    ]

    @dataclass
    class Selected(Message):
        conversation_id: int

    @dataclass
    class SearchChanged(Message):
        query: str

    @dataclass
    class DeleteRequested(Message):
        conversation_id: int

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._showing = asyncio.Lock()  # one listing at a time (the app's focus and the screen both refresh it)

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search chats", id="search")
        yield ListView(id="conversations")

    @property
    def search_text(self) -> str:
        return self.query_one("#search", Input).value

    async def show(self, conversations: list[Conversation], current_id: int | None,
                   elsewhere: set[int] | frozenset[int] = frozenset()) -> None:
        """List `conversations`, highlighting the current one and marking those in `elsewhere` (held by another
        window)."""
        async with self._showing:
            listing = self.query_one("#conversations", ListView)
            await listing.clear()
            await listing.extend(ConversationItem(c, c.id in elsewhere) for c in conversations)
            for index, conversation in enumerate(conversations):
                if conversation.id == current_id:
                    with listing.prevent(ListView.Highlighted):
                        listing.index = index
                    break

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.SearchChanged(event.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.query_one("#conversations", ListView).focus()

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, ConversationItem):
            self.post_message(self.Selected(event.item.conversation_id))

    def action_delete_highlighted(self) -> None:
        item = self.query_one("#conversations", ListView).highlighted_child
        if isinstance(item, ConversationItem):
            self.post_message(self.DeleteRequested(item.conversation_id))
