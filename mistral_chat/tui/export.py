"""Writing a conversation to a Markdown or JSON file under the app home's exports folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from mistral_chat.chat.conversation import Conversation
from mistral_chat.errors import MistralChatError

ExportKind = Literal["markdown", "json"]


class ExportError(MistralChatError):
    """The export file could not be written; the message says where and what to do."""


def export_path(conversation: Conversation, kind: ExportKind, folder: Path) -> Path:
    slug = re.sub(r"[^\w-]+", "-", conversation.title.lower()).strip("-")[:40] or "chat"
    return folder / f"{conversation.id}-{slug}.{'md' if kind == 'markdown' else 'json'}"


def export_conversation(conversation: Conversation, kind: ExportKind, folder: Path, model: str = "") -> Path:
    """Write `conversation` into `folder` (made if missing); returns the file. Raises ExportError."""
    path = export_path(conversation, kind, folder)
    text = conversation.to_markdown(model) if kind == "markdown" else conversation.to_json(model)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ExportError(f"cannot write {path}: {reason}; make {folder} writable, or set MISTRAL_CHAT_HOME to "
                          "a writable folder") from exc
    return path
