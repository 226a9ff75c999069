"""The models the TUI can open: a small front to models/store.py, so the UI survives its changes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mistral_chat.errors import MistralChatError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelChoice:
    name: str
    path: Path
    detail: str = ""


def local_models() -> list[ModelChoice]:
    """Models on disk that are ready to run; empty when the store cannot tell."""
    try:
        from mistral_chat.models.pull import human_bytes, human_count  # the figures `mistral-chat list` shows
        from mistral_chat.models.store import list_models

        rows = list_models()
    except Exception:  # noqa: BLE001 - the picker must open even if the store has a problem
        log.warning("cannot list local models", exc_info=True)
        return []
    choices = []
    for row in rows:
        if not getattr(row, "ready", True):
            continue
        params = getattr(row, "parameters", None)
        size = getattr(row, "size_on_disk", None)
        detail = "  ".join(x for x in (getattr(row, "format", None) or "",
                                       f"{human_count(params)} params" if params else "",
                                       human_bytes(size) if size else "",
                                       getattr(row, "source", "")) if x)
        choices.append(ModelChoice(row.name, Path(row.path), detail))
    return choices


def start_model(name: str | None) -> tuple[Path, str] | None:
    """The folder (and name) of the model to open at start: `name`, else the last used; None when there is none.

    Raises MistralChatError when `name` (or the remembered one) cannot be found.
    """
    from mistral_chat.models.store import last_used_model, resolve_model

    if name is None:
        name = last_used_model()
        if name is None:
            return None
    return resolve_model(name), name


def remember_model(name: str) -> None:
    try:
        from mistral_chat.models.store import mark_used

        mark_used(name)
    except (MistralChatError, OSError):
        log.warning("cannot remember %s as the last used model", name, exc_info=True)
