"""Two mistral-chat windows on one database: each chat is written by one window at a time (ChatStore.claim)."""

from __future__ import annotations

from pathlib import Path

from textual import events
from tui_helpers import close_welcome, isolated_home, make_app, record_notes, wait_for  # noqa: F401 - autouse

from mistral_chat.chat.store import ChatStore
from mistral_chat.tui.widgets.sidebar import ConversationItem

BUSY = "is open in another mistral-chat window; started a new chat"


def sidebar_items(app) -> dict[int, ConversationItem]:
    return {item.conversation_id: item for item in app.chat.sidebar.query(ConversationItem)}


async def send(pilot, text: str) -> None:
    prompt = pilot.app.chat.prompt
    prompt.focus()
    prompt.load_text(text)
    await pilot.press("enter")
    await pilot.pause()


async def test_a_chat_open_in_another_window_is_not_opened_here(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    window_a = ChatStore(db)  # the other window: it holds its most recent chat
    held = window_a.create_conversation("Held by A")
    window_a.add_message(held.id, "user", "hello from A")
    app = make_app(db, None)
    notes = record_notes(app)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await close_welcome(pilot)
            screen = app.chat
            # the most recent chat is A's: this window started a new one instead, and said so
            assert screen.conversation.id != held.id
            assert f"chat {held.id} {BUSY}" in notes
            assert app.store.holds(screen.conversation.id) and not app.store.holds(held.id)
            items = sidebar_items(app)
            assert items[held.id].elsewhere and not items[screen.conversation.id].elsewhere
            assert "(open elsewhere)" in str(items[held.id].query_one("Label").render())
            # picking it in the sidebar does not open it either (the empty new chat stays)
            own_id = screen.conversation.id
            screen.sidebar.post_message(screen.sidebar.Selected(held.id))
            await wait_for(pilot, lambda: notes.count(f"chat {held.id} {BUSY}") == 2, timeout=10, what="the note")
            assert screen.conversation.id == own_id
            # A starts another chat and writes into it: this window lists it once it has the focus again
            another = window_a.create_conversation("A's second")
            window_a.add_message(another.id, "user", "more from A")
            assert another.id not in sidebar_items(app)
            app.post_message(events.AppFocus())
            await wait_for(pilot, lambda: another.id in sidebar_items(app), timeout=10, what="A's new chat listed")
            assert sidebar_items(app)[another.id].elsewhere
            # A lets its first chat go (it moved on): this window can open it and write into it
            window_a.release(held.id)
            app.post_message(events.AppFocus())
            await wait_for(pilot, lambda: not sidebar_items(app)[held.id].elsewhere, timeout=10, what="the mark")
            screen.sidebar.post_message(screen.sidebar.Selected(held.id))
            await wait_for(pilot, lambda: screen.conversation.id == held.id, timeout=10, what="the switch")
            assert app.store.holds(held.id) and not app.store.holds(own_id)  # the one left is let go
            await send(pilot, "hello from B")
            assert [m.content for m in window_a.load(held.id).messages] == ["hello from A", "hello from B"]
            assert not window_a.claim(held.id)
    finally:
        app.store.close()
        window_a.close()


async def test_a_refused_write_is_said_and_the_app_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    window_a = ChatStore(db)
    app = make_app(db, None)
    notes = record_notes(app)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await close_welcome(pilot)
            screen = app.chat
            conversation_id = screen.conversation.id
            await send(pilot, "first")
            # another window takes the chat (this one let it go: e.g. a lock lost to a crash of ours)
            app.store.release(conversation_id)
            assert window_a.claim(conversation_id)
            await send(pilot, "second")
            assert any(note.startswith("Cannot save your message: conversation") for note in notes)
            assert screen.prompt.text == "second"  # kept in the prompt, to send again
            assert [m.content for m in window_a.load(conversation_id).messages] == ["first"]
            # other writes are refused the same way: said, not raised
            await pilot.press("f2")
            await pilot.pause()
            await pilot.press("ctrl+a", *"Renamed", "enter")
            await pilot.pause()
            assert any(note.startswith("Cannot rename the chat") for note in notes)
            assert window_a.load(conversation_id).title == "first"
            assert app.is_running
            # once the other window lets it go, writing works again
            window_a.release(conversation_id)
            await send(pilot, "second")
            assert [m.content for m in window_a.load(conversation_id).messages] == ["first", "second"]
    finally:
        app.store.close()
        window_a.close()
