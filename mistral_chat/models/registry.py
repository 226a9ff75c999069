"""The app's small record of models: pulled repos (and whether they are ready), registered folders, last use.

It lives in `models.json` under the app home (MISTRAL_CHAT_HOME, default the platform's user data folder for
`mistral-chat`). The weights themselves stay in the Hugging Face cache or in the user's folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mistral_chat.paths import app_home

log = logging.getLogger(__name__)

REGISTRY_FILE = "models.json"

__all__ = ["REGISTRY_FILE", "ModelRecord", "Registry", "app_home"]


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
        path = path or app_home() / REGISTRY_FILE
        if not path.exists():
            return cls(path=path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            models = {name: ModelRecord.from_json(rec) for name, rec in data.get("models", {}).items()}
            return cls(models=models, used=dict(data.get("used", {})), last_used=data.get("last_used"), path=path)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable model registry %s (%s); it will be rewritten", path, exc)
            return cls(path=path)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "version": 1,
            "models": {name: asdict(rec) for name, rec in sorted(self.models.items())},
            "used": self.used,
            "last_used": self.last_used,
        }
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, self.path)

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
