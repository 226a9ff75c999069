"""Renaming and deleting conversations: mixed into ChatScreen (its bindings stay there)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from textual.content import Content

from mistral_chat.chat.store import StoreError
from mistral_chat.tui.safe_text import displayable
from mistral_chat.tui.screens.confirm import ConfirmScreen
from mistral_chat.tui.screens.text_prompt import TextPromptScreen

if TYPE_CHECKING:
    from mistral_chat.tui.screens.chat import ChatScreen

    _Base = ChatScreen
else:
    _Base = object


class ChatListPart(_Base):
    """F2 renames the open chat, F8 (or Delete in the chat list) deletes one after asking."""

    def action_rename_chat(self) -> None:
        conversation = self.conversation
        if conversation is None:
            return

        async def rename(title: str | None) -> None:
            if title:
                try:
                    self.chat_app.store.rename(conversation.id, title)
                except (sqlite3.Error, StoreError) as exc:
                    self.write_failed("rename the chat", exc)
                    return
                conversation.title = title
                self.chat_log.border_title = Content(displayable(title))
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
            try:
                store.delete(conversation_id)
            except (sqlite3.Error, StoreError) as exc:
                self.write_failed("delete the chat", exc)
                await self.refresh_sidebar()
                return
            if self.conversation is not None and self.conversation.id == conversation_id:
                remaining = store.list_conversations()
                await self.open_conversation(remaining[0].id if remaining else None)
            else:
                await self.refresh_sidebar()
            self.notify(f"Deleted “{found.title}”", markup=False)

        self.app.push_screen(ConfirmScreen(f"Delete the chat “{found.title}” and its {len(found.messages)} "
                                           "messages?"), delete)
