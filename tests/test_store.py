"""The SQLite conversation store and history trimming, without a model."""

from __future__ import annotations

from pathlib import Path

from mistral_chat.chat.store import ChatStore
from mistral_chat.chat.templates import ChatMessage
from mistral_chat.chat.trim import trim_history
from mistral_chat.engine.options import SamplingParams


def test_conversations_round_trip_and_search(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "c.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    a = store.create_conversation("Alpha", system_prompt="sys", settings=SamplingParams(temperature=0.5, seed=3))
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


OLD_SCHEMA = """
CREATE TABLE conversations (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '', settings TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL,
    updated_at REAL NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE, role TEXT NOT NULL,
    content TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE preferences (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO conversations VALUES (1, 'Old chat', 'sys', '{"temperature": 0.3, "seed": 5}', 1.0, 2.0);
INSERT INTO messages VALUES (1, 1, 'user', 'hello', 1.0);
INSERT INTO messages VALUES (2, 1, 'assistant', 'hi there', 1.5);
"""


def test_an_old_database_is_migrated_and_keeps_its_chats(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript(OLD_SCHEMA)
    db.close()
    store = ChatStore(tmp_path / "old.db")
    old = store.load(1)
    assert [(m.role, m.content, m.tool_calls) for m in old.messages] == [("user", "hello", ()),
                                                                         ("assistant", "hi there", ())]
    assert old.tools_path == "" and old.settings.temperature == 0.3 and old.settings.stop == ()
    assert old.settings.min_p == 0.0
    store.close()
    store = ChatStore(tmp_path / "old.db")  # a second open finds every column there
    assert store.load(1).title == "Old chat"


def test_tool_calls_results_tools_file_and_new_settings_round_trip(tmp_path: Path) -> None:
    from mistral_chat.chat.tools import ToolCall

    store = ChatStore(tmp_path / "c.db")
    settings = SamplingParams(min_p=0.05, repetition_penalty=1.1, presence_penalty=0.4, stop=("###", "\nUser:"))
    conversation = store.create_conversation("Tools", settings=settings, tools_path="/x/tools.json")
    call = ToolCall("abcDEF123", "get_weather", '{"city": "Paris"}')
    store.add_message(conversation.id, "user", "Weather?")
    streamed = store.add_message(conversation.id, "assistant", '[{"name": "get_weather"')
    store.update_message(streamed.id, "", (call,))
    store.add_message(conversation.id, "tool", '{"temperature": 21}', tool_call_id=call.id, name=call.name)
    store.update_settings(conversation.id, "", settings, "/y/tools.json")
    store.close()

    store = ChatStore(tmp_path / "c.db")
    loaded = store.load(conversation.id)
    assert loaded.tools_path == "/y/tools.json"
    assert loaded.settings == settings
    params = loaded.settings
    assert (params.min_p, params.repetition_penalty, params.presence_penalty, params.stop) == \
        (0.05, 1.1, 0.4, ("###", "\nUser:"))
    assert loaded.messages[1].tool_calls == (call,) and loaded.messages[1].content == ""
    assert (loaded.messages[2].role, loaded.messages[2].tool_call_id, loaded.messages[2].name) == \
        ("tool", call.id, "get_weather")
    assert loaded.pending_tool_calls() == []
    chat = loaded.chat_messages()
    assert chat[1] == ChatMessage("assistant", "", tool_calls=(call,))
    assert chat[2] == ChatMessage("tool", '{"temperature": 21}', tool_call_id=call.id, name="get_weather")
    store.delete_messages_from(conversation.id, loaded.messages[2].id)
    assert store.load(conversation.id).pending_tool_calls() == [call]
    assert "get_weather" in loaded.to_markdown() and '"city": "Paris"' in loaded.to_markdown()
    store.close()


# ---- two app instances on one data folder --------------------------------------------------------------------


def test_second_instance_cannot_write_into_a_conversation_the_first_holds(tmp_path: Path) -> None:
    import pytest

    from mistral_chat.chat.store import ConversationBusyError

    first, second = ChatStore(tmp_path / "c.db"), ChatStore(tmp_path / "c.db")
    conv = first.create_conversation("mine")  # a new conversation is held by its creator
    first.add_message(conv.id, "user", "hello from the first")
    reply = first.add_message(conv.id, "assistant", "hi")
    assert first.holds(conv.id) and second.held_elsewhere(conv.id) and not first.held_elsewhere(conv.id)
    assert not second.claim(conv.id)
    for write in (lambda: second.add_message(conv.id, "user", "hello from the second"),
                  lambda: second.update_message(reply.id, "overwritten"),
                  lambda: second.delete_messages_from(conv.id, reply.id),
                  lambda: second.rename(conv.id, "theirs"),
                  lambda: second.update_settings(conv.id, "sys", SamplingParams()),
                  lambda: second.delete(conv.id)):
        with pytest.raises(ConversationBusyError, match="open in another mistral-chat window"):
            write()
    loaded = second.load(conv.id)  # reading is never blocked
    assert loaded is not None and loaded.title == "mine"
    assert [m.content for m in loaded.messages] == ["hello from the first", "hi"]

    first.release(conv.id)  # the first moves to another chat: now the second may take it
    assert second.claim(conv.id)
    second.add_message(conv.id, "user", "hello from the second")
    with pytest.raises(ConversationBusyError):
        first.add_message(conv.id, "user", "interleaved")
    second.close()  # closing lets go of everything held
    assert first.claim(conv.id)
    first.close()


def test_second_instance_sees_the_first_instances_chats_when_it_refreshes(tmp_path: Path) -> None:
    first, second = ChatStore(tmp_path / "c.db"), ChatStore(tmp_path / "c.db")
    assert second.list_conversations() == []
    a = first.create_conversation("from the first")
    first.add_message(a.id, "user", "needle")
    assert [c.title for c in second.list_conversations()] == ["from the first"]
    assert [c.id for c in second.list_conversations("needle")] == [a.id]
    b = second.create_conversation("from the second")  # each writes its own chats
    second.add_message(b.id, "user", "x")
    assert {c.title for c in first.list_conversations()} == {"from the first", "from the second"}


def test_a_conversation_held_by_a_killed_process_is_free_again(tmp_path: Path) -> None:
    import subprocess
    import sys

    store = ChatStore(tmp_path / "c.db")
    conv = store.create_conversation("shared")
    store.release(conv.id)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mistral_chat.chat.store import ChatStore\n"
         f"s = ChatStore({str(tmp_path / 'c.db')!r})\nassert s.claim({conv.id})\nprint('held', flush=True)\n"
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not store.claim(conv.id)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the OS drops the lock
        holder.wait(10)
    assert store.claim(conv.id)
    store.add_message(conv.id, "user", "mine now")


def test_finish_reasons_are_stored_and_an_old_database_gets_the_column(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript(OLD_SCHEMA)
    db.close()
    store = ChatStore(tmp_path / "old.db")
    assert [m.finish_reason for m in store.load(1).messages] == [None, None]  # old answers: unknown
    answer = store.add_message(1, "assistant", "partial", finish_reason="cancelled")
    store.add_message(1, "assistant", "whole")
    store.set_finish_reason(answer.id + 1, "length")
    store.close()
    store = ChatStore(tmp_path / "old.db")
    assert [m.finish_reason for m in store.load(1).messages] == [None, None, "cancelled", "length"]
    store.close()
    columns = {row[1] for row in sqlite3.connect(tmp_path / "old.db").execute("PRAGMA table_info(messages)")}
    assert "finish_reason" in columns
