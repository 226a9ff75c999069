"""Conversations on disk: one SQLite database (WAL), safe to write while an answer streams in.

Every write commits at once, so killing the process loses at most what was not yet handed to the store.
One connection per store; the TUI uses it from its event-loop thread only.

Databases of earlier versions are migrated when opened: missing columns are added (`MIGRATIONS`), nothing is
dropped. Tool calls are kept as OpenAI-style JSON ([{"id", "type", "function": {"name", "arguments"}}]).

Several app instances may open one database (two terminals on one data folder). Each conversation is written by
one instance at a time: the store that writes into a conversation holds it (`claim`), through an OS file lock
`<database>.locks/<id>.lock` that the OS releases when the process ends, even by kill -9. A write into a
conversation another instance holds raises `ConversationBusyError` and changes nothing. Reads are never blocked:
`list_conversations` and `load` see what other instances committed.
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

from filelock import FileLock, Timeout

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
    ("messages", "finish_reason", "TEXT"),  # why an answer ended ("stop", "length", "cancelled"...); NULL = unknown
]
CONVERSATION_COLUMNS = "id, title, system_prompt, settings, created_at, updated_at, tools_path"
MESSAGE_COLUMNS = "id, role, content, created_at, tool_calls, tool_call_id, name, finish_reason"


class StoreError(MistralChatError):
    """The conversation database cannot be opened or written."""


class ConversationBusyError(StoreError):
    """Another app instance holds the conversation (it is open there): nothing was written."""

    def __init__(self, conversation_id: int) -> None:
        super().__init__(f"conversation {conversation_id} is open in another mistral-chat window, which writes into "
                         "it: nothing was written here; start a new chat, or close it there first")
        self.conversation_id = conversation_id


class ChatStore:
    """Conversations, their messages and the UI's preferences in one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._held: dict[int, FileLock] = {}
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
        for conversation_id in list(self._held):
            self.release(conversation_id)
        self._db.close()

    # ---- which instance writes into which conversation ---------------------------------------------------

    def _lock_path(self, conversation_id: int) -> Path:
        return self.path.with_name(f"{self.path.name}.locks") / f"{int(conversation_id)}.lock"

    def claim(self, conversation_id: int) -> bool:
        """Hold the conversation for this store to write into: True when it does (now or already), False when
        another instance (another process, or another store on the same file) holds it. Held until `release`,
        `close` or the end of the process."""
        if conversation_id in self._held:
            return True
        path = self._lock_path(conversation_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(path, timeout=0, thread_local=False)
            lock.acquire(timeout=0)
        except Timeout:
            return False
        except OSError as exc:  # a read-only data folder: nobody can write here, so nobody else can either
            log.warning("cannot lock conversation %s (%s); writing without a lock", conversation_id, exc)
            return True
        self._held[conversation_id] = lock
        return True

    def release(self, conversation_id: int) -> None:
        """Let other instances write into the conversation (when this one moves to another chat)."""
        lock = self._held.pop(conversation_id, None)
        if lock is not None:
            lock.release()

    def holds(self, conversation_id: int) -> bool:
        """Whether this store holds the conversation."""
        return conversation_id in self._held

    def held_elsewhere(self, conversation_id: int) -> bool:
        """Whether another instance holds the conversation now (to mark it in a list); nothing is kept."""
        if conversation_id in self._held:
            return False
        if not self.claim(conversation_id):
            return True
        self.release(conversation_id)
        return False

    def _require(self, conversation_id: int) -> None:
        if not self.claim(conversation_id):
            raise ConversationBusyError(conversation_id)

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
        self.claim(int(cur.lastrowid or 0))  # a new id (never reused): nobody else can hold it
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
        self._require(conversation_id)
        self._db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def delete(self, conversation_id: int) -> None:
        self._require(conversation_id)
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        self._lock_path(conversation_id).unlink(missing_ok=True)  # still held: ids are never reused
        self.release(conversation_id)

    def update_settings(self, conversation_id: int, system_prompt: str, settings: SamplingParams,
                        tools_path: str | None = None) -> None:
        """Save a conversation's system prompt and settings (and its tools file, unless None)."""
        self._require(conversation_id)
        self._db.execute("UPDATE conversations SET system_prompt = ?, settings = ? WHERE id = ?",
                         (system_prompt, json.dumps(asdict(settings)), conversation_id))
        if tools_path is not None:
            self._db.execute("UPDATE conversations SET tools_path = ? WHERE id = ?", (tools_path, conversation_id))

    def _touch(self, db: sqlite3.Connection, conversation_id: int) -> None:
        db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conversation_id))

    # ---- messages ----------------------------------------------------------------------------------------

    def add_message(self, conversation_id: int, role: str, content: str, *, tool_calls: tuple[ToolCall, ...] = (),
                    tool_call_id: str | None = None, name: str | None = None,
                    finish_reason: str | None = None) -> Message:
        self._require(conversation_id)
        now = time.time()
        with self._transaction() as db:
            cur = db.execute("INSERT INTO messages (conversation_id, role, content, created_at, tool_calls, "
                             "tool_call_id, name, finish_reason) VALUES (?,?,?,?,?,?,?,?)",
                             (conversation_id, role, content, now, _calls_json(tool_calls), tool_call_id, name,
                              finish_reason))
            self._touch(db, conversation_id)
        return Message(role=role, content=content, id=int(cur.lastrowid or 0), created_at=now,  # type: ignore[arg-type]
                       tool_calls=tuple(tool_calls), tool_call_id=tool_call_id, name=name,
                       finish_reason=finish_reason)

    def update_message(self, message_id: int, content: str, tool_calls: tuple[ToolCall, ...] | None = None) -> None:
        """Replace a message's text (and its tool calls, unless None)."""
        row = self._db.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            return
        self._require(row[0])
        if tool_calls is None:
            self._db.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))
        else:
            self._db.execute("UPDATE messages SET content = ?, tool_calls = ? WHERE id = ?",
                             (content, _calls_json(tool_calls), message_id))

    def set_finish_reason(self, message_id: int, finish_reason: str | None) -> None:
        """Record why an answer ended ("stop", "length", "cancelled", "error", "tool_calls"; None = unknown)."""
        row = self._db.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            return
        self._require(row[0])
        self._db.execute("UPDATE messages SET finish_reason = ? WHERE id = ?", (finish_reason, message_id))

    def delete_messages_from(self, conversation_id: int, message_id: int) -> None:
        """Delete `message_id` and every later message of the conversation."""
        self._require(conversation_id)
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
                   tool_call_id=row[5], name=row[6], finish_reason=row[7])
