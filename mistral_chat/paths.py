"""Where mistral-chat keeps its files: conversations, preferences and user themes.

Everything lives under the app home when MISTRAL_CHAT_HOME is set (tests, portable installs). Otherwise data
(the conversation database, the model registry) goes to the platform's user data folder and the files a user
edits by hand (themes) to its user config folder, as XDG and platformdirs lay them out.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "mistral-chat"
HOME_ENV = "MISTRAL_CHAT_HOME"
DATABASE_FILE = "conversations.db"


def app_home() -> Path:
    """MISTRAL_CHAT_HOME, else the platform's user data folder for mistral-chat."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def config_home() -> Path:
    """MISTRAL_CHAT_HOME, else the platform's user config folder for mistral-chat."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def database_path() -> Path:
    """The SQLite file that holds conversations and UI preferences."""
    return app_home() / DATABASE_FILE


def user_themes_dir() -> Path:
    """Where a user drops extra theme files (`*.toml`)."""
    return config_home() / "themes"


def shipped_themes_dir() -> Path | None:
    """The themes that come with mistral-chat: installed as package data, or the repository's `themes/`."""
    package = Path(__file__).parent
    for candidate in (package / "themes", package.parent / "themes"):
        if candidate.is_dir():
            return candidate
    return None
