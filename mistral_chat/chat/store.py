"""Conversations on disk: one SQLite database (WAL), safe to write while an answer streams in.

Every write commits at once, so killing the process loses at most what was not yet handed to the store.
One connection per store; the TUI uses it from its event-loop thread only.

Databases of earlier versions are migrated when opened: missing columns are added (`MIGRATIONS`), nothing is
dropped. Tool calls are kept as OpenAI-style JSON ([{"id", "type", "function": {"name", "arguments"}}]).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from mistral_chat.chat.conversation import DEFAULT_TITLE, Conversation, Message
from mistral_chat.chat.tools import ToolCall
from mistral_chat.engine.options import SamplingParams
from mistral_chat.errors import MistralChatError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE TABLE IF NOT EXISTS preferences (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# columns added after the first release: (table, column, declaration); added when missing, in order
MIGRATIONS: list[tuple[str, str, str]] = [
    ("conversations", "tools_path", "TEXT NOT NULL DEFAULT ''"),
    ("messages", "tool_calls", "TEXT NOT NULL DEFAULT ''"),
    ("messages", "tool_call_id", "TEXT"),
    ("messages", "name", "TEXT"),
]
CONVERSATION_COLUMNS = "id, title, system_prompt, settings, created_at, updated_at, tools_path"
MESSAGE_COLUMNS = "id, role, content, created_at, tool_calls, tool_call_id, name"


class StoreError(MistralChatError):
    """The conversation database cannot be opened or written."""


class ChatStore:
    """Conversations, their messages and the UI's preferences in one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the conversation database {self.path}: {exc}; check that the folder "
                             "is writable, or set MISTRAL_CHAT_HOME to another folder") from exc

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        for table, column, declaration in MIGRATIONS:
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                log.info("adding column %s.%s to %s", table, column, self.path)
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---- conversations -----------------------------------------------------------------------------------

    def create_conversation(self, title: str = DEFAULT_TITLE, system_prompt: str = "",
                            settings: SamplingParams | None = None, tools_path: str = "") -> Conversation:
        now = time.time()
        settings = settings or SamplingParams()
        cur = self._db.execute(
            "INSERT INTO conversations (title, system_prompt, settings, created_at, updated_at, tools_path) "
            "VALUES (?,?,?,?,?,?)", (title, system_prompt, json.dumps(asdict(settings)), now, now, tools_path))
        return Conversation(id=int(cur.lastrowid or 0), title=title, system_prompt=system_prompt,
                            settings=settings, created_at=now, updated_at=now, tools_path=tools_path)

    def list_conversations(self, search: str = "") -> list[Conversation]:
        """Most recently updated first, without messages; `search` matches titles and message text."""
        sql = f"SELECT {CONVERSATION_COLUMNS} FROM conversations"
        args: tuple[str, ...] = ()
        if search.strip():
            pattern = f"%{_escape_like(search.strip())}%"
            sql += (" WHERE title LIKE ? ESCAPE '\\' OR id IN "
                    "(SELECT conversation_id FROM messages WHERE content LIKE ? ESCAPE '\\')")
            args = (pattern, pattern)
        sql += " ORDER BY updated_at DESC, id DESC"
        return [_conversation(row) for row in self._db.execute(sql, args)]

    def load(self, conversation_id: int) -> Conversation | None:
        row = self._db.execute(f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?",
                               (conversation_id,)).fetchone()
        if row is None:
            return None
        conv = _conversation(row)
        conv.messages = [_message(r) for r in self._db.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))]
        return conv

    def rename(self, conversation_id: int, title: str) -> None:
        self._db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def delete(self, conversation_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def update_settings(self, conversation_id: int, system_prompt: str, settings: SamplingParams,
                        tools_path: str | None = None) -> None:
        """Save a conversation's system prompt and settings (and its tools file, unless None)."""
        self._db.execute("UPDATE conversations SET system_prompt = ?, settings = ? WHERE id = ?",
                         (system_prompt, json.dumps(asdict(settings)), conversation_id))
        if tools_path is not None:
            self._db.execute("UPDATE conversations SET tools_path = ? WHERE id = ?", (tools_path, conversation_id))

    def _touch(self, db: sqlite3.Connection, conversation_id: int) -> None:
        db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conversation_id))

    # ---- messages ----------------------------------------------------------------------------------------

    def add_message(self, conversation_id: int, role: str, content: str, *, tool_calls: tuple[ToolCall, ...] = (),
                    tool_call_id: str | None = None, name: str | None = None) -> Message:
        now = time.time()
        with self._transaction() as db:
            cur = db.execute("INSERT INTO messages (conversation_id, role, content, created_at, tool_calls, "
                             "tool_call_id, name) VALUES (?,?,?,?,?,?,?)",
                             (conversation_id, role, content, now, _calls_json(tool_calls), tool_call_id, name))
            self._touch(db, conversation_id)
        return Message(role=role, content=content, id=int(cur.lastrowid or 0), created_at=now,  # type: ignore[arg-type]
                       tool_calls=tuple(tool_calls), tool_call_id=tool_call_id, name=name)

    def update_message(self, message_id: int, content: str, tool_calls: tuple[ToolCall, ...] | None = None) -> None:
        """Replace a message's text (and its tool calls, unless None)."""
        if tool_calls is None:
            self._db.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))
        else:
            self._db.execute("UPDATE messages SET content = ?, tool_calls = ? WHERE id = ?",
                             (content, _calls_json(tool_calls), message_id))

    def delete_messages_from(self, conversation_id: int, message_id: int) -> None:
        """Delete `message_id` and every later message of the conversation."""
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (conversation_id, message_id))
            self._touch(db, conversation_id)

    # ---- preferences -------------------------------------------------------------------------------------

    def get_preference(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM preferences WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_preference(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO preferences (key, value) VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _conversation(row: tuple) -> Conversation:
    try:
        settings = SamplingParams.from_json(json.loads(row[3]))
    except (ValueError, TypeError):
        log.warning("conversation %s has unreadable settings; using the defaults", row[0])
        settings = SamplingParams()
    return Conversation(id=row[0], title=row[1], system_prompt=row[2], settings=settings,
                        created_at=row[4], updated_at=row[5], tools_path=row[6] or "")


def _calls_json(calls: tuple[ToolCall, ...]) -> str:
    return json.dumps([call.to_json() for call in calls], ensure_ascii=False) if calls else ""


def _calls(text: str, message_id: int) -> tuple[ToolCall, ...]:
    if not text:
        return ()
    try:
        return tuple(ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in json.loads(text))
    except (ValueError, TypeError, KeyError):
        log.warning("message %s has unreadable tool calls; showing it without them", message_id)
        return ()


def _message(row: tuple) -> Message:
    return Message(role=row[1], content=row[2], id=row[0], created_at=row[3], tool_calls=_calls(row[4], row[0]),
                   tool_call_id=row[5], name=row[6])
