"""The app's small record of models: pulled repos (and whether they are ready), registered folders, last use.

It lives in `models.json` under the app home (MISTRAL_CHAT_HOME, default the platform's user data folder for
`mistral-chat`). The weights themselves stay in the Hugging Face cache or in the user's folder.

Every change is a load-modify-replace under a file lock (`models.json.lock`, see `Registry.locked`), so concurrent
commands (eight `pull FOLDER` at once, a TUI and a one-shot) all land. A file that cannot be read (a hand edit
with a trailing comma) is never overwritten: loading it raises `RegistryError` naming the file, and a copy is kept
next to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock

from mistral_chat.errors import MistralChatError
from mistral_chat.paths import app_home

log = logging.getLogger(__name__)

REGISTRY_FILE = "models.json"

__all__ = ["REGISTRY_FILE", "ModelRecord", "Registry", "RegistryError", "app_home"]


class RegistryError(MistralChatError):
    """models.json cannot be read: it is left as it is (and a copy kept) until the user fixes or moves it."""


@dataclass
class ModelRecord:
    """One model the app knows: a pull from the hub (`hub`) or a folder the user registered (`local`)."""

    name: str
    source: Literal["hub", "local"]
    path: str = ""  # local: the folder; hub: the snapshot folder once known
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    format: str | None = None
    files: list[str] = field(default_factory=list)
    ready: bool = False
    added_at: float = field(default_factory=time.time)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelRecord":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Registry:
    """What `models.json` holds. Load it, change it, save it; writes are atomic."""

    models: dict[str, ModelRecord] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)  # name or absolute path -> last use (epoch seconds)
    last_used: str | None = None
    path: Path = field(default_factory=lambda: app_home() / REGISTRY_FILE)

    @classmethod
    def load(cls, path: Path | None = None) -> "Registry":
        """The registry as on disk (empty when there is no file yet); RegistryError when the file is unreadable."""
        path = path or app_home() / REGISTRY_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path=path)
        except OSError as exc:
            raise RegistryError(f"cannot read the model registry {path} ({exc.strerror or exc}): "
                                "fix its permissions, then run the command again") from exc
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict):
                raise TypeError("the top level is not an object")
            for key in ("models", "used"):
                if not isinstance(data.get(key, {}), dict):
                    raise TypeError(f"{key!r} is not an object")
            models = {str(name): ModelRecord.from_json(rec) for name, rec in data.get("models", {}).items()}
            used = {str(k): float(v) for k, v in data.get("used", {}).items()}
            last_used = data.get("last_used")
            if last_used is not None and not isinstance(last_used, str):
                raise TypeError("last_used is not a string")
        except (ValueError, TypeError, AttributeError) as exc:
            backup = _keep_copy(path, raw)
            kept = f" (a copy is kept at {backup})" if backup else ""
            raise RegistryError(
                f"the model registry {path} is not valid ({_reason(exc)}){kept}: fix it by hand, or move it away to "
                "start an empty registry (pulled models stay in the Hugging Face cache), then run the command again"
            ) from exc
        return cls(models=models, used=used, last_used=last_used, path=path)

    @classmethod
    @contextmanager
    def locked(cls, path: Path | None = None) -> Iterator["Registry"]:
        """Load, let the caller change, and save, holding `models.json.lock` throughout (nothing is saved when the
        block raises). Every writer goes through here, so concurrent updates are never lost."""
        path = path or app_home() / REGISTRY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(f"{path.name}.lock"), mode=0o664):
            registry = cls.load(path)
            yield registry
            registry.save()

    def save(self) -> None:
        """Replace the file atomically (callers hold the lock: use `Registry.locked`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "version": 1,
            "models": {name: asdict(rec) for name, rec in sorted(self.models.items())},
            "used": self.used,
            "last_used": self.last_used,
        }
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def find(self, name: str) -> ModelRecord | None:
        """A record by name (case-insensitive), by repo id, or by folder path."""
        if name in self.models:
            return self.models[name]
        lowered = name.lower()
        for rec in self.models.values():
            if rec.name.lower() == lowered or (rec.repo_id and rec.repo_id.lower() == lowered):
                return rec
        return None

    def find_path(self, path: Path) -> ModelRecord | None:
        resolved = str(path.resolve())
        return next((r for r in self.models.values() if r.path and str(Path(r.path).resolve()) == resolved), None)

    def free_name(self, wanted: str) -> str:
        """`wanted`, or `wanted-2`, `wanted-3`, ... when taken."""
        name, n = wanted, 2
        while name in self.models:
            name, n = f"{wanted}-{n}", n + 1
        return name

    def touch(self, key: str) -> None:
        self.used[key] = time.time()
        self.last_used = key


def _reason(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc) or type(exc).__name__


def _keep_copy(path: Path, raw: bytes) -> Path | None:
    """A copy of an unreadable registry next to it, named by its content (written once); None if it cannot be."""
    backup = path.with_name(f"{path.name}.unreadable-{hashlib.sha256(raw).hexdigest()[:8]}")
    try:
        if not backup.exists():
            backup.write_bytes(raw)
    except OSError:
        return None
    return backup
