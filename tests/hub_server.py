"""A tiny Hugging Face Hub on 127.0.0.1 for tests: the endpoints huggingface_hub's client calls, nothing more.

- GET  /api/models/{owner}/{name}[/revision/{rev}][?blobs=True]   model info: sha, siblings with size/blobId/lfs
- HEAD /{owner}/{name}/resolve/{rev}/{file}                        X-Repo-Commit, ETag, X-Linked-Etag/-Size, Length
- GET  /{owner}/{name}/resolve/{rev}/{file}   (Range: bytes=N-)    200, or 206 with Content-Range
- GET  /api/models/{owner}/{name}/tree/{rev}                        file list, as `snapshot_download` asks it
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as the real hub does.

Knobs: a repo may be gated (401 without a token, 403 with the wrong one), the next N requests may fail with 503,
one download may have its connection cut after K bytes, downloads may be throttled (so that concurrent pulls
overlap), and a hostile repo may report any `sha` or sibling fields it likes. Every request is logged in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pth")


@dataclass(frozen=True)
class HubFile:
    name: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        if self.lfs:  # the git blob is the LFS pointer; its id is not the content's
            return hashlib.sha1(b"pointer " + self.data[:64]).hexdigest()
        return hashlib.sha1(f"blob {len(self.data)}\0".encode() + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def sibling(self) -> dict:
        out = {"rfilename": self.name, "size": len(self.data), "blobId": self.blob_id}
        if self.lfs:
            out["lfs"] = {"size": len(self.data), "sha256": self.sha256, "pointerSize": 134}
        return out


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    gated_token: str | None = None
    reported_sha: str | None = None  # a hostile hub: the `sha` model info reports instead of the real commit
    sibling_overrides: dict[str, dict] = field(default_factory=dict)  # file name -> fields to replace in siblings

    @property
    def commit(self) -> str:
        h = hashlib.sha1(self.repo_id.encode())
        for f in sorted(self.files):
            h.update(f.encode() + self.files[f].etag.encode())
        return h.hexdigest()


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int = 0


@dataclass
class _Knobs:
    fail_remaining: int = 0
    fail_status: int = 503
    cut: dict[str, int] = field(default_factory=dict)  # file name -> bytes to send before cutting (once)
    chunk_delay: float = 0.0  # seconds to wait after each 1 MiB of a download (0: send at once)


def is_lfs(name: str, data: bytes) -> bool:
    return name.endswith(LFS_SUFFIXES) or name.startswith("tokenizer.model") or len(data) > 1_000_000


class HubServer:
    """Start with `with HubServer() as hub:`; `hub.endpoint` is the HF_ENDPOINT to use."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[LoggedRequest] = []
        self._knobs = _Knobs()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- building repos
    def add_repo(self, repo_id: str, files: dict[str, bytes], gated_token: str | None = None) -> HubRepo:
        repo = HubRepo(repo_id, {n: HubFile(n, d, is_lfs(n, d)) for n, d in files.items()}, gated_token)
        self.repos[repo_id] = repo
        return repo

    def add_folders(self, repo_id: str, *folders: Path, gated_token: str | None = None,
                    extra: dict[str, bytes] | None = None) -> HubRepo:
        files = {p.name: p.read_bytes() for folder in folders for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return self.add_repo(repo_id, {**files, **(extra or {})}, gated_token)

    # ---- knobs
    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._knobs.fail_remaining, self._knobs.fail_status = n, status

    def cut_once(self, filename: str, after_bytes: int) -> None:
        with self._lock:
            self._knobs.cut[filename] = after_bytes

    def throttle(self, chunk_delay: float) -> None:
        """Wait `chunk_delay` seconds after each MiB of every download (0 turns it off)."""
        with self._lock:
            self._knobs.chunk_delay = chunk_delay

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def downloads(self, filename: str | None = None) -> list[LoggedRequest]:
        """GET requests on /resolve/ (of one file name when given)."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path
                and (filename is None or r.path.endswith("/" + filename))]

    # ---- used by the handler
    def _take_failure(self) -> int | None:
        with self._lock:
            if self._knobs.fail_remaining > 0:
                self._knobs.fail_remaining -= 1
                return self._knobs.fail_status
        return None

    def _take_cut(self, filename: str) -> int | None:
        with self._lock:
            return self._knobs.cut.pop(filename, None)


_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?$")
_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return None

        def _log(self) -> LoggedRequest:
            entry = LoggedRequest(self.command, urlsplit(self.path).path, self.headers.get("Range"),
                                  self.headers.get("Authorization"))
            with hub._lock:
                hub.requests.append(entry)
            return entry

        def _error(self, entry: LoggedRequest, status: int, code: str | None, message: str,
                   extra: dict[str, str] | None = None) -> None:
            entry.status = status
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._serve()

        def do_GET(self) -> None:
            self._serve()

        def _serve(self) -> None:
            entry = self._log()
            if (status := hub._take_failure()) is not None:
                return self._error(entry, status, None, "Service Unavailable")
            path = unquote(urlsplit(self.path).path)
            if self.command == "GET" and (m := _TREE.match(path)):
                return self._tree(entry, m.group(1), m.group(2))
            if self.command == "GET" and (m := _API.match(path)):
                return self._model_info(entry, m.group(1), m.group(2) or "main")
            if m := _RESOLVE.match(path):
                return self._resolve(entry, m.group(1), m.group(2), m.group(3))
            return self._error(entry, 404, None, "Not Found")

        def _repo(self, entry: LoggedRequest, repo_id: str, revision: str) -> HubRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(entry, 404, "RepoNotFound", "Repository not found")
                return None
            if revision not in ("main", repo.commit, repo.reported_sha):
                self._error(entry, 404, "RevisionNotFound", "Invalid rev id: " + revision)
                return None
            return repo

        def _json(self, entry: LoggedRequest, data: object) -> None:
            body = json.dumps(data).encode()
            entry.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _tree(self, entry: LoggedRequest, repo_id: str, revision: str) -> None:
            repo = self._repo(entry, repo_id, revision)
            if repo is None:
                return
            items = []
            for f in repo.files.values():
                item = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": f.name}
                if f.lfs:
                    item["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                items.append(item)
            self._json(entry, items)

        def _model_info(self, entry: LoggedRequest, repo_id: str, revision: str) -> None:
            repo = self._repo(entry, repo_id, revision)
            if repo is None:
                return
            info = {
                "_id": repo.commit[:24], "id": repo_id, "modelId": repo_id,
                "sha": repo.commit if repo.reported_sha is None else repo.reported_sha,
                "private": False, "gated": "manual" if repo.gated_token else False, "disabled": False,
                "tags": [], "downloads": 0, "likes": 0, "lastModified": "2024-05-22T00:00:00.000Z",
                "siblings": [{**f.sibling(), **repo.sibling_overrides.get(f.name, {})} for f in repo.files.values()],
            }
            self._json(entry, info)

        def _resolve(self, entry: LoggedRequest, repo_id: str, revision: str, filename: str) -> None:
            repo = self._repo(entry, repo_id, revision)
            if repo is None:
                return
            if repo.gated_token is not None:
                auth = self.headers.get("Authorization")
                if auth is None:
                    return self._error(entry, 401, "GatedRepo", f"Access to model {repo_id} is restricted.")
                if auth != f"Bearer {repo.gated_token}":
                    return self._error(entry, 403, "GatedRepo",
                                       f"Access to model {repo_id} is restricted and you are not in the "
                                       "authorized list.")
            file = repo.files.get(filename)
            if file is None:
                return self._error(entry, 404, "EntryNotFound", f"{filename} does not exist",
                                   {"X-Repo-Commit": repo.commit})
            size = len(file.data)
            start = 0
            rng = self.headers.get("Range")
            if rng and self.command == "GET":
                m = re.match(r"bytes=(\d+)-(\d*)$", rng)
                if m is None or int(m.group(1)) >= size:
                    return self._error(entry, 416, None, "Range Not Satisfiable",
                                       {"Content-Range": f"bytes */{size}"})
                start = int(m.group(1))
            status = 206 if start else 200
            entry.status = status
            self.send_response(status)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{file.blob_id}"')
            if file.lfs:
                self.send_header("X-Linked-Etag", f'"{file.sha256}"')
                self.send_header("X-Linked-Size", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            cut = hub._take_cut(filename)
            body = file.data[start:]
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            delay = hub._knobs.chunk_delay
            if not delay:
                self.wfile.write(body)
                return
            for i in range(0, len(body), 1 << 20):
                self.wfile.write(body[i:i + (1 << 20)])
                self.wfile.flush()
                time.sleep(delay)

    return Handler
