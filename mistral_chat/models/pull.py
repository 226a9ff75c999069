"""`pull`: turn an alias, a repo id or a folder into a model that is ready to load."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from mistral_chat.errors import DownloadError, MistralChatError, ModelFilesError, ModelNotFoundError
from mistral_chat.models import download
from mistral_chat.models.catalogue import alias_for_repo, did_you_mean, lookup_alias, looks_like_repo_id
from mistral_chat.models.download import CachePaths, RemoteFile, RetryPolicy, hub_error, with_retries
from mistral_chat.models.files import FormatChoice, FileSelection, select_files, select_local_files
from mistral_chat.models.hub_settings import HubSettings, hub_settings
from mistral_chat.models.progress import PullProgress
from mistral_chat.models.registry import ModelRecord, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullTarget:
    """What a MODEL argument names: a folder, or a repository (with the alias it was called by, if any)."""

    name: str
    repo_id: str | None = None
    local_dir: Path | None = None


@dataclass(frozen=True)
class PullResult:
    """A ready model: its name, folder, format and the bytes fetched this time."""

    name: str
    path: Path
    format: str
    repo_id: str | None
    commit: str | None
    files: tuple[str, ...]
    total_bytes: int
    downloaded_bytes: int


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def parse_target(name: str) -> PullTarget:
    """A folder that exists, an alias, or an `owner/name` repo id; anything else is not found."""
    path = Path(name).expanduser()
    if path.is_dir():
        return PullTarget(name=path.resolve().name, local_dir=path.resolve())
    if looks_like_path(name):
        raise ModelFilesError(f"no folder {name}: check the path (a model folder holds params.json or config.json)")
    if (entry := lookup_alias(name)) is not None:
        return PullTarget(name=entry.alias, repo_id=entry.repo_id)
    if looks_like_repo_id(name):  # a catalogue repo keeps its alias, so both spellings name one model
        return PullTarget(name=alias_for_repo(name) or name, repo_id=name)
    raise ModelNotFoundError(
        f"unknown model {name!r}{did_you_mean(name)}: use a catalogue alias (see `mistral-chat list --catalogue`), "
        "a Hugging Face repo id owner/name, or a folder"
    )


def register_local(model_dir: Path, fmt: FormatChoice = "auto", registry: Registry | None = None) -> PullResult:
    """Record a folder under its name (after checking the engine can read it); its files stay where they are."""
    from mistral_chat.engine.config import load_config

    model_dir = model_dir.expanduser().resolve()
    selection = select_local_files(model_dir, fmt)
    load_config(model_dir)  # raises ModelFilesError with what to fix
    with Registry.locked(registry.path if registry else None) as registry:
        record = registry.find_path(model_dir)
        if record is None:
            record = ModelRecord(name=registry.free_name(model_dir.name), source="local", path=str(model_dir))
        record.format, record.files, record.ready = selection.format, list(selection.files), True
        registry.models[record.name] = record
    size = sum((model_dir / f).stat().st_size for f in selection.files)
    return PullResult(record.name, model_dir, selection.format, None, None, selection.files, size, 0)


def _remote_files(info_siblings: list, selection: FileSelection) -> list[RemoteFile]:
    by_name = {s.rfilename: s for s in info_siblings}
    files = []
    for name in selection.files:
        s = by_name[name]
        size = s.lfs.size if s.lfs else s.size
        if size is None:
            raise DownloadError(f"the hub gave no size for {name}: try again later")
        if isinstance(size, bool) or not isinstance(size, int):
            raise DownloadError(f"the hub gave an invalid size for {name}: try again later")
        files.append(RemoteFile(name=name, size=size, sha256=s.lfs.sha256 if s.lfs else None, blob_id=s.blob_id))
    return files


def check_disk_space(folder: Path, needed: int) -> None:
    """Refuse before downloading when the disk holding `folder` has less than `needed` bytes free."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DownloadError(
            f"not enough disk space: the download needs {human_bytes(needed)} but {probe} has "
            f"{human_bytes(free)} free; free some space or set HF_HOME to a folder on a bigger disk"
        )


def human_count(n: int | None) -> str:
    """A parameter count as `list` shows it: 4.3M, 7.2B ("?" when unknown)."""
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def pull_model(name: str, revision: str = "main", fmt: FormatChoice = "auto", token: str | None = None,
               progress: PullProgress | None = None, retry: RetryPolicy | None = None) -> PullResult:
    """Download the files the engine needs (one format) into the Hugging Face cache, or register a folder."""
    target = parse_target(name)
    if target.local_dir is not None:
        return register_local(target.local_dir, fmt)
    assert target.repo_id is not None
    download.check_revision(revision)
    settings = hub_settings(token)
    retry = retry or download.DEFAULT_RETRY
    progress = progress or PullProgress()
    if settings.offline:
        raise DownloadError(
            f"HF_HUB_OFFLINE is set, so {target.repo_id} cannot be downloaded: unset HF_HUB_OFFLINE to pull, "
            f"or use a model already on disk (`mistral-chat list`)"
        )
    try:
        return _pull_repo(target, settings, revision, fmt, progress, retry)
    except MistralChatError:
        raise
    except Exception as exc:  # noqa: BLE001 - every hub/network/disk failure becomes one actionable line
        raise hub_error(exc, target.repo_id, settings, revision, retry.attempts,
                        download.partial_bytes(settings, target.repo_id)) from exc


def download_size(name: str, revision: str = "main", fmt: FormatChoice = "auto", token: str | None = None,
                  retry: RetryPolicy | None = None) -> int:
    """The bytes that `pull_model(name)` would fetch in all (from the hub's file list; nothing is downloaded);
    0 for a folder. Hub errors are pull's one-line errors."""
    target = parse_target(name)
    if target.repo_id is None:
        return 0
    download.check_revision(revision)
    settings = hub_settings(token)
    retry = retry or download.DEFAULT_RETRY
    if settings.offline:
        raise DownloadError(
            f"HF_HUB_OFFLINE is set, so {target.repo_id} cannot be downloaded: unset HF_HUB_OFFLINE to pull, "
            f"or use a model already on disk (`mistral-chat list`)"
        )
    try:
        _, _, remotes = _remote_selection(target.repo_id, settings, revision, fmt, retry)
    except MistralChatError:
        raise
    except Exception as exc:  # noqa: BLE001 - as pull_model
        raise hub_error(exc, target.repo_id, settings, revision, retry.attempts, 0) from exc
    return sum(r.size for r in remotes)


def _bytes_on_disk(paths: CachePaths, commit: str, remotes: list[RemoteFile]) -> int:
    complete = sum(r.size for r in remotes if (paths.snapshot(commit) / r.name).exists())
    return complete + sum(download.partial_size(paths, r) for r in remotes)


def _forget_unless_ready(name: str) -> None:
    with Registry.locked() as registry:
        record = registry.models.get(name)
        if record is not None and not record.ready:
            del registry.models[name]


def _remote_selection(repo_id: str, settings: HubSettings, revision: str, fmt: FormatChoice,
                      retry: RetryPolicy) -> tuple[str, FileSelection, list[RemoteFile]]:
    """The commit `revision` names, the files the engine needs from it, and their sizes (from the hub's list)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=settings.endpoint, token=settings.token)
    info = with_retries(lambda: api.model_info(repo_id, revision=revision, files_metadata=True),
                        retry, f"model info for {repo_id}")
    commit = info.sha
    if not commit:
        raise DownloadError(f"the hub gave no commit for {repo_id}@{revision}: try again later")
    download.check_commit(commit, settings.endpoint)
    siblings = info.siblings or []
    selection = select_files([s.rfilename for s in siblings], fmt, source=f"{repo_id}@{revision}")
    return commit, selection, _remote_files(siblings, selection)


def _pull_repo(target: PullTarget, settings: HubSettings, revision: str, fmt: FormatChoice,
               progress: PullProgress, retry: RetryPolicy) -> PullResult:
    repo_id = target.repo_id
    assert repo_id is not None
    commit, selection, remotes = _remote_selection(repo_id, settings, revision, fmt, retry)
    paths = CachePaths.of(settings, repo_id)

    with Registry.locked() as registry:
        record = registry.models.get(target.name) or ModelRecord(name=target.name, source="hub")
        if (record.repo_id, record.commit, record.format) != (repo_id, commit, selection.format):
            record.ready = False  # another commit or format: not ready until its files are
        record.repo_id, record.revision, record.commit = repo_id, revision, commit
        record.format, record.files = selection.format, list(selection.files)
        record.path = str(paths.snapshot(commit))
        registry.models[record.name] = record

    total = sum(r.size for r in remotes)
    pending = [r for r in remotes if download.cached_file(paths, commit, r) is None]
    already = total - sum(r.size for r in pending) + sum(download.partial_size(paths, r) for r in pending)
    check_disk_space(settings.cache_dir, total - already)
    paths.write_ref(revision, commit)
    progress.start(total, already)
    try:
        for remote in pending:
            download.fetch_file(settings, repo_id, commit, remote, progress, retry)
    except BaseException:
        if not _bytes_on_disk(paths, commit, remotes):
            _forget_unless_ready(target.name)  # refused before the first byte (gated, 404...): nothing to resume
        raise
    finally:
        progress.stop()

    with Registry.locked() as registry:  # re-read under the lock: another command may have written meanwhile
        record = registry.models.get(target.name, record)
        record.ready = True
        registry.models[record.name] = record
    log.info("pulled %s (%s) at %s", repo_id, selection.format, commit)
    return PullResult(target.name, paths.snapshot(commit), selection.format, repo_id, commit, selection.files,
                      total, total - already)
