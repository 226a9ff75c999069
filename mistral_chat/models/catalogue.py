"""Short names for well-known Mistral models, each mapped to its Hugging Face repository."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class CatalogueEntry:
    """One alias: the name a user types and the repository it stands for."""

    alias: str
    repo_id: str
    description: str


CATALOGUE: dict[str, CatalogueEntry] = {
    e.alias: e
    for e in (
        CatalogueEntry("mistral-7b-instruct", "mistralai/Mistral-7B-Instruct-v0.3", "Mistral 7B Instruct v0.3"),
        CatalogueEntry("mistral-7b-instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", "Mistral 7B Instruct v0.2"),
        CatalogueEntry("mistral-7b-instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", "Mistral 7B Instruct v0.1"),
        CatalogueEntry("mistral-7b", "mistralai/Mistral-7B-v0.3", "Mistral 7B v0.3 base model"),
        CatalogueEntry("mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1", "Mixtral 8x7B Instruct v0.1"),
        CatalogueEntry("mixtral-8x22b-instruct", "mistralai/Mixtral-8x22B-Instruct-v0.1",
                       "Mixtral 8x22B Instruct v0.1"),
        CatalogueEntry("nemo-instruct", "mistralai/Mistral-Nemo-Instruct-2407", "Mistral Nemo 12B Instruct (tekken)"),
        CatalogueEntry("codestral", "mistralai/Codestral-22B-v0.1", "Codestral 22B v0.1"),
        CatalogueEntry("mathstral", "mistralai/Mathstral-7B-v0.1", "Mathstral 7B v0.1"),
        CatalogueEntry("mistral-small-instruct", "mistralai/Mistral-Small-Instruct-2409", "Mistral Small 22B Instruct"),
        CatalogueEntry("mistral-large-instruct", "mistralai/Mistral-Large-Instruct-2407",
                       "Mistral Large 123B Instruct"),
    )
}

DEFAULT_ALIAS = "mistral-7b-instruct"  # what a bare `mistral-chat` offers to download when nothing is on disk


def lookup_alias(name: str) -> CatalogueEntry | None:
    """The catalogue entry for an alias (case-insensitive), or None."""
    return CATALOGUE.get(name.strip().lower())


def alias_for_repo(repo_id: str) -> str | None:
    """The alias of a repository, when the catalogue has one."""
    for entry in CATALOGUE.values():
        if entry.repo_id.lower() == repo_id.lower():
            return entry.alias
    return None


def looks_like_repo_id(name: str) -> bool:
    """`owner/name`, as the Hugging Face Hub spells repository ids."""
    return bool(REPO_ID_PATTERN.match(name))


def close_names(name: str, extra: Iterable[str] = (), limit: int = 3) -> list[str]:
    """Aliases, repo ids and `extra` names that look like `name`, best first."""
    candidates = {*CATALOGUE, *(e.repo_id for e in CATALOGUE.values()), *extra}
    lowered = {c.lower(): c for c in candidates}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=limit, cutoff=0.5)
    return [lowered[m] for m in matches]


def did_you_mean(name: str, extra: Iterable[str] = ()) -> str:
    """' (did you mean a, b?)' or an empty string."""
    names = close_names(name, extra)
    return f" (did you mean {', '.join(names)}?)" if names else ""
