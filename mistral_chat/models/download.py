"""Fetch one repository file into the Hugging Face cache, resumably, and check it against the hub's metadata.

huggingface_hub does the HTTP: `get_hf_file_metadata` (HEAD on /resolve: X-Repo-Commit, ETag / X-Linked-Etag,
X-Linked-Size) and `http_get` (GET with a Range header from `resume_size`, retrying dropped connections). Its own
`hf_hub_download` deletes partial files when interrupted (huggingface_hub >= 1.x downloads into a process-unique
temporary file), so this module keeps the partial as `blobs/<etag>.incomplete` — the name older releases resumed
from — and appends to it on the next pull. Files land in the standard cache layout (blobs/, snapshots/<commit>/,
refs/<revision>), so other tools find them and `scan_cache_dir` sees them.

huggingface_hub and httpx2 are imported by the functions that talk to the hub, not by this module: finding a model
already on disk (`CachePaths`) must not cost their import at every start-up.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

from mistral_chat.errors import DownloadError, MistralChatError, ModelNotFoundError
from mistral_chat.models.catalogue import did_you_mean
from mistral_chat.models.hub_settings import HubSettings
from mistral_chat.models.progress import PullProgress

log = logging.getLogger(__name__)

T = TypeVar("T")
_HASH_CHUNK = 8 * 1024 * 1024


_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def check_commit(commit: object, source: str) -> str:
    """The hub's commit id for `source`, refused unless it is 40 lowercase hex digits (it names a cache folder)."""
    if not isinstance(commit, str) or not _COMMIT.match(commit):
        raise DownloadError(
            f"the hub at {source} reported an invalid commit id {str(commit)[:60]!r} (expected 40 hex digits): "
            "nothing was written; check HF_ENDPOINT points at a real Hugging Face Hub"
        )
    return commit


def check_revision(revision: str) -> str:
    """A branch, tag or commit name that is safe as a path under refs/: no `..`, no absolute or empty parts."""
    if not _REVISION.match(revision) or ".." in revision.split("/") or len(revision) > 255:
        raise DownloadError(
            f"invalid --revision {revision[:60]!r}: pass a branch, tag or commit id "
            "(letters, digits, '.', '_', '-', '/')"
        )
    return revision


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repository at one commit, as the hub's model info describes it.

    Every field the hub sent that becomes part of a path (the name, the hashes that name the blob) is checked here,
    so that a hostile or broken hub cannot make a pull write outside the cache.
    """

    name: str
    size: int
    sha256: str | None  # LFS files: sha256 of the content, also the cache blob name
    blob_id: str | None  # git blob id: sha1 of b"blob <size>\\0" + content; the blob name of non-LFS files

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _FILE_NAME.match(self.name) or self.name in (".", ".."):
            raise DownloadError(f"the hub listed a file named {str(self.name)[:60]!r}, which is not a plain file name: "
                                "nothing was written; check HF_ENDPOINT points at a real Hugging Face Hub")
        if not isinstance(self.size, int) or self.size < 0:
            raise DownloadError(f"the hub gave an invalid size for {self.name}: try again later")
        if self.sha256 is not None and not (isinstance(self.sha256, str) and _SHA256.match(self.sha256)):
            raise DownloadError(f"the hub gave an invalid sha256 for {self.name} ({str(self.sha256)[:60]!r}): "
                                "nothing was written; check HF_ENDPOINT points at a real Hugging Face Hub")
        if self.blob_id is not None and not (isinstance(self.blob_id, str) and _COMMIT.match(self.blob_id)):
            raise DownloadError(f"the hub gave an invalid blob id for {self.name} ({str(self.blob_id)[:60]!r}): "
                                "nothing was written; check HF_ENDPOINT points at a real Hugging Face Hub")

    @property
    def etag(self) -> str:
        etag = self.sha256 or self.blob_id
        if not etag:
            raise DownloadError(f"the hub gave no hash for {self.name}: try again later")
        return etag


@dataclass(frozen=True)
class RetryPolicy:
    """How often to retry hub errors 5xx and network failures, with exponential backoff."""

    attempts: int = 5
    first_delay: float = 1.0
    max_delay: float = 16.0

    def delays(self) -> list[float]:
        return [min(self.max_delay, self.first_delay * 2**i) for i in range(self.attempts - 1)]


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class CachePaths:
    """Where a repository lives in the Hugging Face cache."""

    storage: Path

    @classmethod
    def of(cls, settings: HubSettings, repo_id: str) -> "CachePaths":
        """models--<owner>--<name>, as huggingface_hub's `file_download.repo_folder_name` names it."""
        return cls(settings.cache_dir / "--".join(["models", *repo_id.split("/")]))

    def blob(self, etag: str) -> Path:
        return self.storage / "blobs" / etag

    def partial(self, etag: str) -> Path:
        return self.storage / "blobs" / f"{etag}.incomplete"

    def snapshot(self, commit: str) -> Path:
        return self.storage / "snapshots" / commit

    def lock(self, etag: str) -> Path:
        """The lock `hf_hub_download` takes for this blob (<cache>/.locks/<repo folder>/<etag>.lock), so a pull and a
        concurrent `hf download` of the same file exclude each other."""
        return self.storage.parent / ".locks" / self.storage.name / f"{etag}.lock"

    def write_ref(self, revision: str, commit: str) -> None:
        if revision == commit:
            return
        ref = self.storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)

    def read_ref(self, revision: str) -> str | None:
        ref = self.storage / "refs" / revision
        return ref.read_text().strip() if ref.is_file() else None


def is_transient(exc: BaseException) -> bool:
    """Hub errors 5xx (and 408/429) and network failures: worth another try."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return exc.response.status_code >= 500 or exc.response.status_code in (408, 429)
    return isinstance(exc, httpx2.TransportError)


def is_unreachable(exc: BaseException) -> bool:
    """No connection could be made at all (no route, refused, DNS, connect timeout): retried once, not more."""
    import httpx2

    return isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout))


def with_retries(call: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """Run `call`, retrying transient failures with backoff; the last failure is raised as it came.

    A hub that cannot be reached at all gets one more try (one "retrying" line), not the whole backoff: without a
    route to it, waiting longer only delays the message that says so."""
    delays = policy.delays()
    unreachable_before = False
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - re-raised unless transient
            if not is_transient(exc) or attempt == len(delays):
                raise
            if is_unreachable(exc):
                if unreachable_before:
                    raise
                unreachable_before = True
                log.warning("%s: cannot connect (%s); retrying once in %.1fs", what, _short(exc), delays[attempt])
            else:
                log.warning("%s failed (%s); retrying in %.1fs [%d/%d]", what, _short(exc), delays[attempt],
                            attempt + 1, policy.attempts - 1)
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def _short(exc: BaseException) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


def hub_error(exc: BaseException, repo_id: str, settings: HubSettings, revision: str | None = None,
              attempts: int = 1, kept_bytes: int = 0) -> MistralChatError:
    """One-line, actionable error for something huggingface_hub or the network raised; `kept_bytes`: what this
    repository's partial downloads hold (said only when there is something to resume)."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    kept = f" ({kept_bytes:,} bytes downloaded so far are kept and resumed)" if kept_bytes else ""
    page = settings.repo_url(repo_id)
    login = "then run `hf auth login` or set HF_TOKEN (or pass --token)"
    if isinstance(exc, GatedRepoError) or (
        isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code == 403
    ):
        return DownloadError(f"{repo_id} is gated: accept its licence at {page} while logged in, {login}")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFoundError(
            f"no repository {repo_id} on {settings.endpoint}{did_you_mean(repo_id)}: check the name; "
            f"if it is private or gated, {login.replace('then ', '')}"
        )
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(f"{repo_id} has no revision {revision!r}: "
                             "pass an existing branch, tag or commit to --revision")
    if isinstance(exc, RemoteEntryNotFoundError):
        return DownloadError(f"a file of {repo_id} vanished from the hub while pulling: run the pull again")
    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded: unset HF_HUB_OFFLINE to pull")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return DownloadError(f"the hub refused the token for {repo_id} (401): {login} with a valid token")
        if status >= 500 or status in (408, 429):
            return DownloadError(
                f"the hub answered HTTP {status} for {repo_id} {attempts} time(s) in a row: it may be down or busy; "
                f"run the pull again later{kept}"
            )
        return DownloadError(f"the hub answered HTTP {status} for {repo_id}: check the name and --revision, then retry")
    if isinstance(exc, httpx2.TransportError):
        return DownloadError(
            f"cannot reach {settings.endpoint} ({type(exc).__name__}): check your network connection or proxy "
            f"(HF_ENDPOINT if you use a mirror), then run the pull again{kept}"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError(
            f"disk full while downloading {repo_id} into {settings.cache_dir}: free some space (or point HF_HOME at a "
            "bigger disk), then run the pull again to resume"
        )
    if isinstance(exc, MistralChatError):
        return exc
    return DownloadError(f"pulling {repo_id} failed ({type(exc).__name__}: {exc}): run the pull again")


def open_partial(path: Path) -> BinaryIO:
    """The partial file, opened to append (its position is its size)."""
    return path.open("ab")


def _file_digest(path: Path, remote: RemoteFile) -> str:
    if remote.sha256:
        h = hashlib.sha256()
    else:
        h = hashlib.sha1()
        h.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, remote: RemoteFile) -> bool:
    """Size and content hash (sha256 for LFS files, git blob sha1 otherwise) match the hub's metadata."""
    if path.stat().st_size != remote.size:
        return False
    return _file_digest(path, remote) == remote.etag


def _link(blob: Path, pointer: Path) -> None:
    """snapshots/<commit>/<name> -> ../../blobs/<etag>, as huggingface_hub lays out its cache (copy if no symlinks)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), tmp)
    except OSError:
        import shutil

        shutil.copyfile(blob, tmp)
    os.replace(tmp, pointer)  # atomic: a concurrent pull or reader never sees the pointer missing or half-written


def cached_file(paths: CachePaths, commit: str, remote: RemoteFile) -> Path | None:
    """The snapshot file when its blob is complete and named for the hub's hash, else None (nothing is fetched)."""
    pointer = paths.snapshot(commit) / remote.name
    blob = paths.blob(remote.etag)
    if blob.is_file() and blob.stat().st_size == remote.size:
        if not (pointer.exists() and pointer.resolve() == blob.resolve()):
            if not (pointer.is_file() and not pointer.is_symlink() and pointer.stat().st_size == remote.size):
                _link(blob, pointer)
        return pointer
    return None


def partial_bytes(settings: HubSettings, repo_id: str) -> int:
    """The bytes of every partial download of `repo_id` in the cache (0 when none, or when it cannot be read)."""
    try:
        return sum(p.stat().st_size for p in (CachePaths.of(settings, repo_id).storage / "blobs").glob("*.incomplete"))
    except OSError:
        return 0


def partial_size(paths: CachePaths, remote: RemoteFile) -> int:
    partial = paths.partial(remote.etag)
    return partial.stat().st_size if partial.is_file() else 0


def fetch_file(settings: HubSettings, repo_id: str, commit: str, remote: RemoteFile, progress: PullProgress,
               retry: RetryPolicy) -> Path:
    """Download `remote` at `commit` into the cache (resuming a partial), verify it, and return its snapshot path.

    The blob's lock (huggingface_hub's own, see `CachePaths.lock`) is held from the check for a finished blob to the
    link of the snapshot file: a second pull of the same file, in this process or another, or an `hf download`,
    waits, then finds the blob done instead of appending to the same partial file.
    """
    paths = CachePaths.of(settings, repo_id)
    if (done := cached_file(paths, commit, remote)) is not None:
        return done
    counted = partial_size(paths, remote)  # what the progress bar already counts as done for this file
    with blob_lock(paths, remote, progress):
        if (done := cached_file(paths, commit, remote)) is not None:  # finished while we waited for the lock
            progress.advance(remote.size - counted)
            return done
        progress.advance(partial_size(paths, remote) - counted)  # resumed further (or less) by the last holder
        return _fetch_locked(settings, repo_id, commit, remote, progress, retry, paths)


@contextmanager
def blob_lock(paths: CachePaths, remote: RemoteFile, progress: PullProgress) -> Iterator[None]:
    """Hold the blob's lock; when another download holds it, say so on the progress line, then wait."""
    from filelock import Timeout
    from huggingface_hub.utils import WeakFileLock

    lock = paths.lock(remote.etag)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:
        try:
            held.enter_context(WeakFileLock(lock, timeout=0.05))
        except Timeout:
            log.info("waiting for another download of %s (lock %s)", remote.name, lock)
            progress.file_started(f"{remote.name} (waiting for another download)")
            held.enter_context(WeakFileLock(lock))
        yield


def _fetch_locked(settings: HubSettings, repo_id: str, commit: str, remote: RemoteFile, progress: PullProgress,
                  retry: RetryPolicy, paths: CachePaths) -> Path:
    from huggingface_hub import file_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    partial = paths.partial(remote.etag)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if partial.is_file() and partial.stat().st_size > remote.size:
        partial.unlink()
    progress.file_started(remote.name)
    url = hf_hub_url(repo_id, remote.name, revision=commit, endpoint=settings.endpoint)

    def attempt() -> None:
        metadata = file_download.get_hf_file_metadata(url, token=settings.token, endpoint=settings.endpoint)
        if metadata.etag and metadata.etag != remote.etag:
            raise DownloadError(
                f"{repo_id}/{remote.name} changed on the hub during the pull: run the pull again"
            )
        headers = build_hf_headers(token=settings.token)
        if urlsplit(metadata.location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # a signed CDN url: the token stays on the hub
        with open_partial(partial) as f:
            file_download.http_get(
                metadata.location, f, resume_size=f.tell(), headers=headers, expected_size=remote.size,
                displayed_filename=remote.name, tqdm_class=progress.bar_factory(),  # type: ignore[arg-type]
            )

    with_retries(attempt, retry, f"downloading {repo_id}/{remote.name}")
    if not verify_file(partial, remote):
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"{repo_id}/{remote.name} does not match the hub's size and hash (corrupted download): "
            "it was deleted, run the pull again"
        )
    blob = paths.blob(remote.etag)
    os.chmod(partial, 0o644)
    os.replace(partial, blob)
    pointer = paths.snapshot(commit) / remote.name
    _link(blob, pointer)
    return pointer
