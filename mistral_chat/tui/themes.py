"""Colour themes from TOML files: the ones shipped in `themes/`, then the user's own (which win on a name clash).

A theme file holds the fields of `textual.theme.Theme`: `name`, `primary`, optional `secondary`, `accent`,
`foreground`, `background`, `surface`, `panel`, `warning`, `error`, `success`, `dark`, and a `[variables]` table.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from textual.theme import Theme

from mistral_chat.paths import shipped_themes_dir, user_themes_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

log = logging.getLogger(__name__)

DEFAULT_THEME = "mistral-dark"
THEME_FIELDS = ("name", "primary", "secondary", "warning", "error", "success", "accent", "foreground",
                "background", "surface", "panel", "boost", "dark", "luminosity_spread", "text_alpha", "variables")


def read_theme(path: Path) -> Theme:
    """One theme file; ValueError naming the file when it is not a valid theme."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    unknown = sorted(set(data) - set(THEME_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown theme field(s) {', '.join(unknown)}")
    if "name" not in data or "primary" not in data:
        raise ValueError(f"{path}: a theme needs at least `name` and `primary`")
    try:
        theme = Theme(**data)
        theme.to_color_system().generate()  # catches bad colours now rather than when drawing
    except Exception as exc:  # noqa: BLE001 - textual raises several kinds for bad colours
        raise ValueError(f"{path}: {exc}") from exc
    return theme


def theme_files(folders: Iterable[Path | None]) -> list[Path]:
    files: list[Path] = []
    for folder in folders:
        if folder is not None and folder.is_dir():
            files.extend(sorted(folder.glob("*.toml")))
    return files


def load_themes(folders: Iterable[Path | None] | None = None) -> tuple[list[Theme], list[str]]:
    """Themes from the shipped and user folders (in that order), and a message for each file that failed."""
    folders = [shipped_themes_dir(), user_themes_dir()] if folders is None else folders
    themes: dict[str, Theme] = {}
    problems = []
    for path in theme_files(folders):
        try:
            theme = read_theme(path)
        except ValueError as exc:
            log.warning("skipping theme %s", exc)
            problems.append(str(exc))
            continue
        themes[theme.name] = theme
    return list(themes.values()), problems
