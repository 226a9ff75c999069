"""Models on disk: find one by name or path, list them, describe one, remove one, remember the last used.

A model is a pulled repository (a snapshot folder in the Hugging Face cache, recorded in the registry), a folder the
user registered, a folder passed by path, or a repository some other tool already put in the Hugging Face cache.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mistral_chat.errors import MistralChatError, ModelFilesError, ModelNotFoundError
from mistral_chat.models.catalogue import did_you_mean, lookup_alias, looks_like_repo_id
from mistral_chat.models.download import CachePaths
from mistral_chat.models.files import FileSelection, instruct_format, select_local_files
from mistral_chat.models.hub_settings import hub_settings
from mistral_chat.models.pull import looks_like_path
from mistral_chat.models.registry import ModelRecord, Registry

log = logging.getLogger(__name__)

Source = Literal["hub", "local", "hf-cache", "path"]


@dataclass(frozen=True)
class ModelSummary:
    """One row of `mistral-chat list`."""

    name: str
    source: Source
    path: Path
    repo_id: str | None
    format: str | None
    ready: bool
    size_on_disk: int
    parameters: int | None
    context_length: int | None
    last_used: float | None


@dataclass(frozen=True)
class ModelDetails:
    """What `mistral-chat show` prints."""

    summary: ModelSummary
    revision: str | None
    commit: str | None
    architecture: str | None
    config: dict[str, object]
    tokenizer: str | None
    instruct_format: str | None
    files: list[tuple[str, int]] = field(default_factory=list)


# ---- finding -------------------------------------------------------------------------------------------------


def _cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """A complete snapshot of `repo_id` in the Hugging Face cache (the `revision` ref first), or None."""
    paths = CachePaths.of(hub_settings(), repo_id)
    snapshots = paths.storage / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = paths.read_ref(revision)
    candidates = [snapshots / ref] if ref else []
    candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in candidates:
        if snap.is_dir() and _usable(snap):
            return snap
    return None


def _usable(folder: Path) -> bool:
    try:
        selection = select_local_files(folder)
    except (MistralChatError, OSError):
        return False
    return all((folder / f).is_file() for f in selection.files)


def _record_path(rec: ModelRecord) -> Path:
    if rec.source == "hub" and rec.repo_id and rec.commit:
        return CachePaths.of(hub_settings(), rec.repo_id).snapshot(rec.commit)
    return Path(rec.path)


def resolve_model(name_or_path: str) -> Path:
    """The folder holding the model's files, for a folder path, a registered name, an alias or a cached repo id.

    Raises ModelNotFoundError (with close names and the `pull` command to run) or ModelFilesError (incomplete pull,
    missing folder).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if looks_like_path(name_or_path):
        raise ModelFilesError(f"no folder {name_or_path}: check the path, or pass a model name (`mistral-chat list`)")
    registry = Registry.load()
    alias = lookup_alias(name_or_path)
    record = registry.find(name_or_path) or (registry.find(alias.repo_id) if alias else None)
    if record is not None:
        folder = _record_path(record)
        if record.source == "local":
            if not folder.is_dir():
                raise ModelFilesError(
                    f"{record.name} points to {folder}, which no longer exists: "
                    f"register the folder again with `mistral-chat pull PATH` or run `mistral-chat rm {record.name}`"
                )
            return folder
        if record.ready and all((folder / f).is_file() for f in record.files):
            return folder
        raise ModelFilesError(
            f"{record.name} is not completely downloaded: run `mistral-chat pull {record.name}` to resume"
        )
    repo_id = alias.repo_id if alias else name_or_path if looks_like_repo_id(name_or_path) else None
    if repo_id and (snap := _cached_snapshot(repo_id)) is not None:
        return snap
    known = [r.name for r in registry.models.values()]
    pull_name = alias.alias if alias else name_or_path
    if repo_id:
        raise ModelNotFoundError(f"{pull_name} is not downloaded yet: run `mistral-chat pull {pull_name}`")
    raise ModelNotFoundError(
        f"no model named {name_or_path!r}{did_you_mean(name_or_path, known)}: run `mistral-chat pull NAME` with an "
        "alias or repo id, or pass a model folder (`mistral-chat list` shows what is on disk)"
    )


def mark_used(path_or_name: str | Path) -> None:
    """Remember `path_or_name` as the model used last (and when), for `list` and for a bare `mistral-chat`."""
    with Registry.locked() as registry:
        key = str(path_or_name)
        record = registry.find(key)
        path = Path(key).expanduser()
        if record is None and path.is_dir():
            record = registry.find_path(path)
            if record is None:
                for rec in registry.models.values():
                    if rec.source == "hub" and _record_path(rec).resolve() == path.resolve():
                        record = rec
                        break
            key = record.name if record else str(path.resolve())
        elif record is not None:
            key = record.name
        registry.touch(key)


def last_used_model() -> str | None:
    """The name (or absolute folder path) last passed to `mark_used`; before any use, the model pulled or
    registered last that is ready; else None."""
    registry = Registry.load()
    if registry.last_used is not None:
        return registry.last_used
    ready = [rec for rec in registry.models.values() if rec.ready]
    return max(ready, key=lambda rec: rec.added_at).name if ready else None


# ---- listing -------------------------------------------------------------------------------------------------


def _size(folder: Path, files: list[str] | tuple[str, ...]) -> int:
    return sum((folder / f).stat().st_size for f in files if (folder / f).is_file())


def _summary(name: str, source: Source, folder: Path, repo_id: str | None, ready: bool, files: list[str] | None,
             last_used: float | None, fmt: str | None = None) -> ModelSummary:
    from mistral_chat.engine.config import load_config

    params = context = None
    size = 0
    if folder.is_dir():
        try:
            selection = select_local_files(folder, fmt or "auto")  # type: ignore[arg-type]
            files = files or list(selection.files)
            fmt = fmt or selection.format
        except MistralChatError:
            pass
        try:
            config = load_config(folder)
            params, context = config.parameter_count(), config.max_seq_len
        except MistralChatError:
            pass
        size = _size(folder, files or [])
    return ModelSummary(name, source, folder, repo_id, fmt, ready, size, params, context, last_used)


def _cached_repos() -> list[tuple[str, Path]]:
    """(repo id, snapshot) of every model repository in the Hugging Face cache that mistral-chat can run."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound, CorruptedCacheException

    try:
        info = scan_cache_dir(hub_settings().cache_dir)
    except (CacheNotFound, CorruptedCacheException, OSError):
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type == "model" and (snap := _cached_snapshot(repo.repo_id)) is not None:
            found.append((repo.repo_id, snap))
    return found


def list_models() -> list[ModelSummary]:
    """Registered models (pulled or folders), then runnable repositories other tools put in the HF cache."""
    registry = Registry.load()
    rows = []
    for rec in sorted(registry.models.values(), key=lambda r: r.name.lower()):
        folder = _record_path(rec)
        ready = rec.ready and folder.is_dir() and all((folder / f).is_file() for f in rec.files)
        rows.append(_summary(rec.name, rec.source, folder, rec.repo_id, ready, rec.files or None,
                             registry.used.get(rec.name), rec.format))
    registered = {r.repo_id.lower() for r in registry.models.values() if r.repo_id}
    for repo_id, snap in _cached_repos():
        if repo_id.lower() not in registered:
            rows.append(_summary(repo_id, "hf-cache", snap, repo_id, True, None, registry.used.get(repo_id)))
    return rows


def _find_summary(name: str) -> tuple[ModelSummary, ModelRecord | None]:
    registry = Registry.load()
    alias = lookup_alias(name)
    record = registry.find(name) or (registry.find(alias.repo_id) if alias else None)
    if record is not None:
        rows = {r.name: r for r in list_models()}
        return rows[record.name], record
    folder = resolve_model(name)  # raises ModelNotFoundError with suggestions
    is_cache = not Path(name).expanduser().is_dir()
    repo_id = (alias.repo_id if alias else name) if is_cache else None
    key = repo_id or str(folder)
    summary = _summary(repo_id or folder.name, "hf-cache" if is_cache else "path", folder, repo_id, True, None,
                       registry.used.get(key))
    return summary, None


def describe_model(name: str) -> ModelDetails:
    """Architecture, shape, tokenizer, instruct format and files of a model on disk."""
    from mistral_chat.engine.config import load_config

    summary, record = _find_summary(name)
    folder = summary.path
    architecture = tokenizer = instruct = None
    config_fields: dict[str, object] = {}
    files: list[tuple[str, int]] = []
    selection: FileSelection | None = None
    if folder.is_dir():
        try:
            selection = select_local_files(folder, (summary.format or "auto"))  # type: ignore[arg-type]
        except MistralChatError:
            selection = None
    names = (record.files if record and record.files else list(selection.files) if selection else [])
    for f in names:
        p = folder / f
        files.append((f, p.stat().st_size if p.is_file() else -1))
    if selection is not None:
        tokenizer = selection.tokenizer
        try:
            config = load_config(folder)
            architecture = config.architecture
            instruct = instruct_format(selection.tokenizer, config.vocab_size)
            config_fields = {
                "dim": config.dim, "layers": config.n_layers, "heads": config.n_heads, "kv heads": config.n_kv_heads,
                "head dim": config.head_dim, "hidden dim": config.hidden_dim, "vocab": config.vocab_size,
                "context": config.max_seq_len,
                "sliding window": (", ".join("full" if w is None else str(w) for w in config.layer_windows)
                                   if config.layer_windows else config.sliding_window),
                "rope theta": config.rope_theta,
            }
            if config.is_moe:
                config_fields["experts"] = f"{config.num_experts} ({config.num_experts_per_tok} per token)"
        except MistralChatError as exc:
            config_fields = {"error": str(exc)}
    return ModelDetails(summary, record.revision if record else None, record.commit if record else None,
                        architecture, config_fields, tokenizer, instruct, files)


# ---- removing ------------------------------------------------------------------------------------------------


@dataclass
class RemovalPlan:
    """What `rm` will do, so that the user can confirm it: a description, the bytes freed, and the action."""

    name: str
    description: str
    freed_bytes: int
    _action: Callable[[], None]

    def execute(self) -> None:
        self._action()
        with Registry.locked() as registry:
            registry.models.pop(self.name, None)
            registry.used.pop(self.name, None)
            if registry.last_used == self.name:
                registry.last_used = None


def plan_removal(name: str) -> RemovalPlan:
    """Plan removing a model: a pulled or cached repo revision is deleted from the HF cache; a folder is forgotten."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound, CorruptedCacheException

    registry = Registry.load()
    alias = lookup_alias(name)
    record = registry.find(name) or (registry.find(alias.repo_id) if alias else None)
    if record is not None and record.source == "local":
        return RemovalPlan(record.name, f"forget {record.name} ({record.path}); its files are kept", 0, lambda: None)
    repo_id = record.repo_id if record else (alias.repo_id if alias else name if looks_like_repo_id(name) else None)
    if repo_id is None:
        known = [r.name for r in registry.models.values()]
        raise ModelNotFoundError(f"no model named {name!r}{did_you_mean(name, known)}: `mistral-chat list` shows them")
    settings = hub_settings()
    paths = CachePaths.of(settings, repo_id)
    label = record.name if record else repo_id
    if not paths.storage.exists():
        if record is None:
            raise ModelNotFoundError(f"{repo_id} is not on disk: `mistral-chat list` shows the models there")
        return RemovalPlan(label, f"forget {label} (no files on disk)", 0, lambda: None)
    try:
        cache = scan_cache_dir(settings.cache_dir)
    except (CacheNotFound, CorruptedCacheException) as exc:
        raise ModelFilesError(f"cannot read the Hugging Face cache {settings.cache_dir} ({exc}): run `hf cache scan`")
    repo = next((r for r in cache.repos if r.repo_type == "model" and r.repo_id.lower() == repo_id.lower()), None)
    partials = list((paths.storage / "blobs").glob("*.incomplete"))
    partial_bytes = sum(p.stat().st_size for p in partials)
    commits = {rec_commit for rec_commit in [record.commit if record else None] if rec_commit}
    revisions = [rev.commit_hash for rev in repo.revisions] if repo else []
    targets = [c for c in revisions if c in commits] or revisions
    if repo is None or set(targets) == set(revisions):
        size = (repo.size_on_disk if repo else 0) + partial_bytes

        def delete_repo() -> None:
            shutil.rmtree(paths.storage, ignore_errors=True)

        return RemovalPlan(label, f"delete {repo_id} from {settings.cache_dir}", size, delete_repo)
    strategy = cache.delete_revisions(*targets)

    def delete_revisions() -> None:
        strategy.execute()
        for p in partials:
            p.unlink(missing_ok=True)

    return RemovalPlan(label, f"delete {repo_id} revision {', '.join(c[:8] for c in targets)}",
                       strategy.expected_freed_size + partial_bytes, delete_revisions)


def remove_model(name: str) -> int:
    """Remove a model without asking; returns the bytes freed."""
    plan = plan_removal(name)
    plan.execute()
    return plan.freed_bytes
