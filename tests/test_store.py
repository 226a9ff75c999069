"""The SQLite conversation store and history trimming, without a model."""

from __future__ import annotations

from pathlib import Path

from mistral_chat.chat.conversation import GenerationSettings
from mistral_chat.chat.store import ChatStore
from mistral_chat.chat.templates import ChatMessage
from mistral_chat.chat.trim import trim_history


def test_conversations_round_trip_and_search(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "c.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    a = store.create_conversation("Alpha", system_prompt="sys", settings=GenerationSettings(temperature=0.5, seed=3))
    b = store.create_conversation("Beta")
    store.add_message(a.id, "user", "find 100% of_this")
    reply = store.add_message(a.id, "assistant", "partial")
    store.update_message(reply.id, "partial and more")
    store.close()

    store = ChatStore(tmp_path / "c.db")
    loaded = store.load(a.id)
    assert [m.content for m in loaded.messages] == ["find 100% of_this", "partial and more"]
    assert loaded.settings.temperature == 0.5 and loaded.settings.seed == 3 and loaded.system_prompt == "sys"
    assert [c.id for c in store.list_conversations()] == [a.id, b.id]  # the one with new messages first
    assert [c.id for c in store.list_conversations("100%")] == [a.id]
    assert [c.id for c in store.list_conversations("beta")] == [b.id]
    assert store.list_conversations("1000%") == []
    store.delete_messages_from(a.id, reply.id)
    assert len(store.load(a.id).messages) == 1
    store.delete(a.id)
    assert store.load(a.id) is None
    store.set_preference("theme", "paper")
    assert store.get_preference("theme") == "paper"


def test_trim_keeps_system_and_last_turn() -> None:
    def encode(messages: list[ChatMessage]) -> list[int]:
        return [0] * sum(len(m.content.split()) + 2 for m in messages)

    history = [ChatMessage("system", "s s")]
    for i in range(5):
        history += [ChatMessage("user", "u " * 5), ChatMessage("assistant", "a " * 5)]
    history.append(ChatMessage("user", "last"))
    full = trim_history(history, encode, 1000)
    assert not full.trimmed and full.messages == history
    trimmed = trim_history(history, encode, 30)
    assert trimmed.messages[0].role == "system" and trimmed.messages[-1].content == "last"
    assert trimmed.dropped_messages % 2 == 0 and len(trimmed.ids) <= 30
    assert trimmed.messages[1].role == "user"
    tiny = trim_history(history, encode, 2)  # not even the last turn fits: it is kept, the engine says so
    assert [m.content for m in tiny.messages] == ["s s", "last"]
