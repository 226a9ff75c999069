"""Where the Hugging Face Hub is and where its cache lives, read from the environment at call time.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, when it is imported; reading them again here
means a changed environment (tests, a long-lived process) is honoured, and the values are passed explicitly.
huggingface_hub's own defaults (its `constants`) are imported only when the environment names none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubSettings:
    """The hub endpoint, the cache folder, the token to send (None: the logged-in one) and offline mode."""

    endpoint: str
    cache_dir: Path
    token: str | None
    offline: bool

    def repo_url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"


def hub_cache_dir() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default (~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HUGGINGFACE_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    """HF_ENDPOINT, else huggingface_hub's default (https://huggingface.co)."""
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: nothing may be downloaded."""
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").lower() in _TRUE


def hub_settings(token: str | None = None) -> HubSettings:
    return HubSettings(endpoint=hub_endpoint(), cache_dir=hub_cache_dir(), token=token or None, offline=hub_offline())
