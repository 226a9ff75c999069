"""Pull, list, show and rm through the real huggingface_hub client against a local hub (tests/hub_server.py)."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hub_server import HubServer
from tiny_models import write_tiny_model

from mistral_chat.errors import ModelFilesError, ModelNotFoundError
from mistral_chat.cli import models as commands
from mistral_chat.models import download, pull
from mistral_chat.models.download import RetryPolicy
from mistral_chat.models.progress import PullProgress
from mistral_chat.models.store import last_used_model, list_models, mark_used, resolve_model

ALIAS_REPO = "mistralai/Mistral-7B-Instruct-v0.3"
GOOD_TOKEN = "hf_good_token"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tiny")
    return {"mistral": write_tiny_model(root / "mistral", "mistral"),
            "mixtral": write_tiny_model(root / "mixtral", "mixtral", shard_hf=True)}


@pytest.fixture(scope="session")
def server(tiny: dict[str, dict[str, Path]]) -> Iterator[HubServer]:
    with HubServer() as hub:
        mistral = tiny["mistral"]
        # Like the real repo: both formats side by side, plus files nobody needs.
        hub.add_folders(ALIAS_REPO, mistral["hf"], mistral["native"], extra={"README.md": b"# tiny\n"})
        hub.add_folders("tiny/mixtral-hf", tiny["mixtral"]["hf"])
        hub.add_folders("tiny/gated", mistral["native"], gated_token=GOOD_TOKEN)
        hub.add_folders("tiny/native-only", mistral["native"])
        hub.add_repo("tiny/pytorch-only", {"config.json": (mistral["hf"] / "config.json").read_bytes(),
                                           "pytorch_model.bin": os.urandom(2000),
                                           "tokenizer.model": b"spm" * 100})
        yield hub


@pytest.fixture
def hub(server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """A clean HF cache and app home for each test, pointed at the local hub; never the real network."""
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("MISTRAL_CHAT_HOME", str(tmp_path / "app"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))  # no real login leaks in
    monkeypatch.setattr(download, "DEFAULT_RETRY", RetryPolicy(attempts=4, first_delay=0.01))
    server.fail_next(0)
    server.throttle(0)
    server.clear_log()
    return server


def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub"


def run_cli(*args: str, input: str | None = None) -> tuple[int, str, str]:
    """The commands as the main CLI runs them: one line on stderr and a non-zero exit for user errors."""
    app = typer.Typer()
    commands.register(app)
    runner = CliRunner()
    with runner.isolation(input=input) as (out, err, _):
        code = commands.run_command(app, list(args))
        sys.stdout.flush()
        sys.stderr.flush()
        return code, out.getvalue().decode(), err.getvalue().decode()


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_folder_is_named_as_huggingface_hub_names_it(tmp_path: Path) -> None:
    """CachePaths names a repository's folder itself (importing huggingface_hub to find a model on disk would cost
    every start-up its import); the name must stay the one `hf` and `scan_cache_dir` use."""
    from huggingface_hub.file_download import repo_folder_name

    from mistral_chat.models.hub_settings import HubSettings

    settings = HubSettings(endpoint="http://hub.invalid", cache_dir=tmp_path, token=None, offline=True)
    for repo_id in (ALIAS_REPO, "tiny/native-only", "Org_1/model.v2-x", "single"):
        expected = tmp_path / repo_folder_name(repo_id=repo_id, repo_type="model")
        assert download.CachePaths.of(settings, repo_id).storage == expected


# ---- a full pull ---------------------------------------------------------------------------------------------


def test_pull_alias_downloads_native_files_only_into_hf_cache(hub: HubServer, tmp_path: Path,
                                                              tiny: dict[str, dict[str, Path]]) -> None:
    code, out, err = run_cli("pull", "mistral-7b-instruct")
    assert code == 0, err
    assert "mistral-7b-instruct is ready (native" in out
    fetched = sorted(r.path.rsplit("/", 1)[1] for r in hub.downloads())
    assert fetched == ["consolidated.safetensors", "params.json", "tokenizer.model.v3"]  # never both formats

    storage = cache_dir(tmp_path) / "models--mistralai--Mistral-7B-Instruct-v0.3"
    commit = (storage / "refs" / "main").read_text()
    snapshot = storage / "snapshots" / commit
    weights = snapshot / "consolidated.safetensors"
    assert weights.is_symlink()  # huggingface_hub's layout: snapshot -> blob named by its sha256
    assert weights.resolve().name == sha256(tiny["mistral"]["native"] / "consolidated.safetensors")
    assert weights.read_bytes() == (tiny["mistral"]["native"] / "consolidated.safetensors").read_bytes()
    assert not list((storage / "blobs").glob("*.incomplete"))

    assert resolve_model("mistral-7b-instruct") == snapshot
    assert resolve_model(ALIAS_REPO) == snapshot
    from mistral_chat.engine.config import load_config

    assert load_config(snapshot).checkpoint_format == "native"

    hub.clear_log()  # a second pull finds everything on disk
    code, out, _ = run_cli("pull", "mistral-7b-instruct")
    assert code == 0 and "already on disk" in out
    assert hub.downloads() == []


def test_pull_repo_id_in_hf_format_with_shards(hub: HubServer, tmp_path: Path) -> None:
    code, out, err = run_cli("pull", "tiny/mixtral-hf")
    assert code == 0, err
    path = resolve_model("tiny/mixtral-hf")
    names = sorted(p.name for p in path.iterdir())
    assert "model.safetensors.index.json" in names and "config.json" in names
    assert len([n for n in names if n.startswith("model-")]) == 8
    assert "generation_config.json" not in names
    row = next(r for r in list_models() if r.name == "tiny/mixtral-hf")
    assert row.format == "hf" and row.ready and row.parameters and row.context_length == 512


def test_pull_format_option(hub: HubServer) -> None:
    code, out, err = run_cli("pull", ALIAS_REPO, "--format", "hf")
    assert code == 0, err
    assert "mistral-7b-instruct is ready (hf" in out  # a catalogue repo keeps its alias
    fetched = sorted(r.path.rsplit("/", 1)[1] for r in hub.downloads())
    assert fetched == ["config.json", "model.safetensors", "tokenizer.model.v3"]
    code, _, err = run_cli("pull", "tiny/native-only", "--format", "hf")
    assert code == 1
    assert_one_line_error(err, "no Hugging Face-format weights", "--format native")


# ---- resuming ------------------------------------------------------------------------------------------------


def test_connection_cut_mid_file_resumes_with_range(hub: HubServer, tmp_path: Path,
                                                    tiny: dict[str, dict[str, Path]]) -> None:
    hub.cut_once("consolidated.safetensors", 12_000_000)
    code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 0, err
    gets = hub.downloads("consolidated.safetensors")
    assert [g.range for g in gets] == [None, "bytes=10485760-"]
    assert gets[1].status == 206
    weights = resolve_model("tiny/native-only") / "consolidated.safetensors"
    assert sha256(weights) == sha256(tiny["mistral"]["native"] / "consolidated.safetensors")


class InterruptAfter(PullProgress):
    """Acts like Ctrl-C once `limit` bytes have come in."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, 0

    def advance(self, n_bytes: int) -> None:
        self.seen += n_bytes
        if self.seen >= self.limit:
            raise KeyboardInterrupt


def test_ctrl_c_leaves_partial_that_next_pull_resumes(hub: HubServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(commands, "progress_for", lambda console, label: InterruptAfter(12_000_000))
        code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 130
    assert_one_line_error(err, "interrupted", "mistral-chat pull tiny/native-only", "resume")
    storage = cache_dir(tmp_path) / "models--tiny--native-only"
    partials = list((storage / "blobs").glob("*.incomplete"))
    assert len(partials) == 1 and partials[0].stat().st_size > 1_000_000
    kept = partials[0].stat().st_size

    row = next(r for r in list_models() if r.name == "tiny/native-only")
    assert not row.ready  # listed, but not as ready
    code, out, _ = run_cli("list")
    assert "incomplete" in out
    with pytest.raises(ModelFilesError, match="not completely downloaded"):
        resolve_model("tiny/native-only")

    hub.clear_log()
    code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 0, err
    assert [g.range for g in hub.downloads("consolidated.safetensors")] == [f"bytes={kept}-"]
    assert resolve_model("tiny/native-only").is_dir()


def test_corrupt_partial_is_detected_by_hash(hub: HubServer, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(commands, "progress_for", lambda console, label: InterruptAfter(12_000_000))
        run_cli("pull", "tiny/native-only")
    partial = next((cache_dir(tmp_path) / "models--tiny--native-only" / "blobs").glob("*.incomplete"))
    data = bytearray(partial.read_bytes())
    data[100] ^= 0xFF
    partial.write_bytes(bytes(data))
    code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 1
    assert_one_line_error(err, "does not match the hub's size and hash", "run the pull again")
    assert not partial.exists()
    code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 0, err


# ---- errors --------------------------------------------------------------------------------------------------


def test_gated_repo_needs_licence_and_token(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli("pull", "tiny/gated")
    assert code == 1
    assert_one_line_error(err, "tiny/gated is gated", f"{hub.endpoint}/tiny/gated", "hf auth login", "HF_TOKEN")
    assert any(r.status == 401 for r in hub.requests)
    assert list_models() == []  # refused before the first byte: nothing half-pulled is listed

    code, _, err = run_cli("pull", "tiny/gated", "--token", "hf_wrong")
    assert code == 1
    assert_one_line_error(err, "is gated")
    assert any(r.status == 403 for r in hub.requests)

    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    code, _, err = run_cli("pull", "tiny/gated")
    assert code == 0, err
    assert all(r.authorization == f"Bearer {GOOD_TOKEN}" for r in hub.downloads())


def test_5xx_is_retried_then_recovers(hub: HubServer) -> None:
    hub.fail_next(2)
    code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 0, err
    assert sum(r.status == 503 for r in hub.requests) == 2


def test_5xx_that_persists_gives_up_clearly(hub: HubServer) -> None:
    hub.fail_next(1000)
    code, _, err = run_cli("pull", "tiny/native-only")
    hub.fail_next(0)
    assert code == 1
    assert_one_line_error(err, "HTTP 503", "4 time(s)", "try again later" if False else "run the pull again later")
    assert len(hub.requests) == 4  # attempts of the policy, then stop


def test_unknown_repo_and_alias_suggest_close_names(hub: HubServer) -> None:
    code, _, err = run_cli("pull", "mistral-7b-instruc")
    assert code == 1
    assert_one_line_error(err, "unknown model 'mistral-7b-instruc'", "did you mean mistral-7b-instruct")
    assert hub.requests == []  # decided without the network

    code, _, err = run_cli("pull", "mistralai/Mistral-7B-Instruct-v0.4")
    assert code == 1
    assert_one_line_error(err, "no repository mistralai/Mistral-7B-Instruct-v0.4",
                          "did you mean mistralai/Mistral-7B-Instruct-v0.3")

    code, _, err = run_cli("pull", "tiny/native-only", "--revision", "nope")
    assert code == 1
    assert_one_line_error(err, "has no revision 'nope'", "--revision")

    with pytest.raises(ModelNotFoundError, match="run `mistral-chat pull mixtral-8x7b-instruct`"):
        resolve_model("mixtral-8x7b-instruct")
    with pytest.raises(ModelNotFoundError, match="did you mean mistral-7b-instruct"):
        resolve_model("mistral-7b-instrct")


def test_no_network(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 1
    assert_one_line_error(err, f"cannot reach http://127.0.0.1:{port}", "network")


def _dead_endpoint() -> str:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_no_route_to_the_hub_fails_fast_with_one_retry_line(hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Issue 28: ~15 s through four WARNING lines before the message; and "downloaded bytes are kept" with none."""
    monkeypatch.setattr(download, "DEFAULT_RETRY", RetryPolicy())  # the real backoff: 1, 2, 4, 8 s
    monkeypatch.setenv("HF_ENDPOINT", _dead_endpoint())
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="mistral_chat.models.download"):
        code, _, err = run_cli("pull", "tiny/native-only")
    assert time.monotonic() - started < 3.0
    assert code == 1
    assert_one_line_error(err, "cannot reach", "network")
    assert "kept" not in err  # nothing was downloaded
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) <= 1, [r.getMessage() for r in retries]


def test_lost_hub_after_a_partial_download_says_the_bytes_are_kept(hub: HubServer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(commands, "progress_for", lambda console, label: InterruptAfter(12_000_000))
        run_cli("pull", "tiny/native-only")
    partial = next((cache_dir(tmp_path) / "models--tiny--native-only" / "blobs").glob("*.incomplete"))
    monkeypatch.setenv("HF_ENDPOINT", _dead_endpoint())
    code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 1
    assert_one_line_error(err, "cannot reach", f"{partial.stat().st_size:,} bytes downloaded so far are kept")


def test_offline_mode_refuses_to_pull_but_finds_downloaded_models(hub: HubServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_cli("pull", "tiny/native-only")[0] == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_log()
    code, _, err = run_cli("pull", "tiny/mixtral-hf")
    assert code == 1
    assert_one_line_error(err, "HF_HUB_OFFLINE is set")
    assert resolve_model("tiny/native-only").is_dir()
    assert hub.requests == []


def test_unsupported_repository(hub: HubServer) -> None:
    code, _, err = run_cli("pull", "tiny/pytorch-only")
    assert code == 1
    assert_one_line_error(err, "tiny/pytorch-only@main is not a model mistral-chat can run", ".bin")
    assert hub.downloads() == []


def test_refuses_when_disk_is_too_small(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(pull.shutil, "disk_usage", lambda p: real(p)._replace(free=5_000_000))
    code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 1
    assert_one_line_error(err, "not enough disk space", "needs 17.7 MB", "5.0 MB free", "HF_HOME")
    assert hub.downloads() == []


class FullDisk:
    """A partial file whose disk fills up after `room` bytes."""

    def __init__(self, path: Path, room: int) -> None:
        self._f = path.open("ab")
        self._room = room

    def __enter__(self) -> "FullDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def tell(self) -> int:
        return self._f.tell()

    def write(self, data: bytes) -> int:
        if self._f.tell() + len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)


def test_disk_full_mid_download(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(download, "open_partial", lambda path: FullDisk(path, 12_000_000))
        code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 1
    assert_one_line_error(err, "disk full", "free some space", "resume")
    hub.clear_log()
    code, _, err = run_cli("pull", "tiny/native-only")
    assert code == 0, err
    ranges = [g.range for g in hub.downloads("consolidated.safetensors")]
    assert len(ranges) == 1 and ranges[0] and ranges[0].startswith("bytes=")


# ---- list, show, rm, local folders, other tools' downloads ----------------------------------------------------


def test_list_show_rm(hub: HubServer, tmp_path: Path) -> None:
    assert run_cli("list")[1].startswith("no models yet")
    assert last_used_model() is None
    assert run_cli("pull", "mistral-7b-instruct")[0] == 0
    assert last_used_model() == "mistral-7b-instruct"  # before any use: the model pulled last
    mark_used("mistral-7b-instruct")
    assert last_used_model() == "mistral-7b-instruct"

    code, out, _ = run_cli("list")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("mistral-7b-instruct"))
    for field in (ALIAS_REPO, "native", "17.7 MB", "512", "just now", "ready"):
        assert field in line, line

    code, out, _ = run_cli("show", "mistral-7b-instruct")
    assert code == 0
    for field in ("architecture", "mistral", "tokenizer.model.v3", "instruct format", "v3",
                  "consolidated.safetensors", "params.json", "sliding window", "16"):
        assert field in out, out
    code, out, _ = run_cli("show", "tiny/mixtral-hf")
    assert code == 1

    code, out, _ = run_cli("rm", "mistral-7b-instruct", input="n\n")
    assert code == 1 and "nothing removed" in out
    assert resolve_model("mistral-7b-instruct").is_dir()

    storage = cache_dir(tmp_path) / "models--mistralai--Mistral-7B-Instruct-v0.3"
    code, out, _ = run_cli("rm", "mistral-7b-instruct", input="y\n")
    assert code == 0 and "removed mistral-7b-instruct (frees 17.7 MB)" in out
    assert not storage.exists()
    assert list_models() == []
    assert last_used_model() is None


def test_rm_yes_does_not_ask_and_frees_partials(hub: HubServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(commands, "progress_for", lambda console, label: InterruptAfter(12_000_000))
        run_cli("pull", "tiny/native-only")
    code, out, err = run_cli("rm", "tiny/native-only", "--yes")
    assert code == 0, err
    assert not (cache_dir(tmp_path) / "models--tiny--native-only").exists()


def test_local_directory_is_registered(hub: HubServer, tiny: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "my-model"
    shutil.copytree(tiny["mistral"]["native"], folder)
    code, out, err = run_cli("pull", str(folder))
    assert code == 0, err
    assert "registered my-model (native" in out
    assert resolve_model("my-model") == folder
    rows = {r.name: r for r in list_models()}
    assert rows["my-model"].source == "local" and rows["my-model"].ready
    mark_used(str(folder))
    assert last_used_model() == "my-model"
    assert run_cli("rm", "my-model", "--yes")[0] == 0
    assert folder.is_dir() and (folder / "consolidated.safetensors").exists()  # forgotten, not deleted

    code, _, err = run_cli("pull", str(tmp_path))
    assert code == 1
    assert_one_line_error(err, "is not a model mistral-chat can run")
    code, _, err = run_cli("pull", "./does-not-exist")
    assert code == 1
    assert_one_line_error(err, "no folder ./does-not-exist")


def test_model_downloaded_by_other_tools_is_found(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download("tiny/native-only", cache_dir=str(cache_dir(tmp_path)), endpoint=hub.endpoint)
    path = resolve_model("tiny/native-only")  # no registry entry: straight from the HF cache
    assert (path / "params.json").exists()
    rows = {r.name: r for r in list_models()}
    assert rows["tiny/native-only"].source == "hf-cache" and rows["tiny/native-only"].ready
    hub.clear_log()
    code, out, _ = run_cli("pull", "tiny/native-only")
    assert code == 0 and "already on disk" in out
    assert hub.downloads() == []


def test_registry_is_plain_json(hub: HubServer, tmp_path: Path) -> None:
    run_cli("pull", "tiny/native-only")
    data = json.loads((tmp_path / "app" / "models.json").read_text())
    record = data["models"]["tiny/native-only"]
    assert record["ready"] is True and record["format"] == "native" and record["repo_id"] == "tiny/native-only"


# ---- concurrent pulls: one lock per blob, huggingface_hub's own -----------------------------------------------


def _blob_lock_path(tmp_path: Path, repo_folder: str, etag: str) -> Path:
    """Where hf_hub_download puts its lock for a blob (huggingface_hub/file_download.py: <cache>/.locks/...)."""
    return cache_dir(tmp_path) / ".locks" / repo_folder / f"{etag}.lock"


def _pull_in_thread(name: str) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(pull.pull_model(name))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_pull_waits_for_the_blob_lock_an_hf_download_holds(hub: HubServer, tmp_path: Path,
                                                           tiny: dict[str, dict[str, Path]]) -> None:
    """An `hf download` of the same file holds huggingface_hub's lock: the pull waits, then finds the blob done."""
    from huggingface_hub.utils import WeakFileLock

    source = tiny["mistral"]["native"] / "consolidated.safetensors"
    etag = sha256(source)
    lock = _blob_lock_path(tmp_path, "models--tiny--native-only", etag)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        thread, outcome = _pull_in_thread("tiny/native-only")
        time.sleep(1.0)
        assert thread.is_alive() and not outcome
        assert hub.downloads("consolidated.safetensors") == []  # nothing fetched or appended while the lock is held
        blob = cache_dir(tmp_path) / "models--tiny--native-only" / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)  # what the other tool leaves when it is done
    thread.join(30)
    assert outcome and isinstance(outcome[0], pull.PullResult), outcome
    assert hub.downloads("consolidated.safetensors") == []  # checked again once the lock was ours
    weights = resolve_model("tiny/native-only") / "consolidated.safetensors"
    assert sha256(weights) == etag


def test_two_pulls_of_one_model_at_once_download_each_file_once(hub: HubServer, tmp_path: Path,
                                                                tiny: dict[str, dict[str, Path]]) -> None:
    hub.throttle(0.05)  # ~1 s for the weights, so that the two pulls overlap
    threads = [_pull_in_thread("tiny/native-only") for _ in range(2)]
    for thread, _ in threads:
        thread.join(60)
    for _, outcome in threads:
        assert outcome and isinstance(outcome[0], pull.PullResult), outcome
    assert len(hub.downloads("consolidated.safetensors")) == 1
    storage = cache_dir(tmp_path) / "models--tiny--native-only"
    source = tiny["mistral"]["native"] / "consolidated.safetensors"
    blob = storage / "blobs" / sha256(source)
    assert blob.stat().st_size == source.stat().st_size and sha256(blob) == sha256(source)
    assert not list((storage / "blobs").glob("*.incomplete"))
    assert sha256(resolve_model("tiny/native-only") / "consolidated.safetensors") == sha256(source)


# ---- a hostile hub: nothing it reports is used as a path unchecked --------------------------------------------


def _files_outside(root: Path, inside: Path) -> list[Path]:
    return [p for p in root.rglob("*") if inside not in p.parents and p != inside]


def test_hub_commit_sha_with_path_parts_is_refused(hub: HubServer, tmp_path: Path,
                                                   tiny: dict[str, dict[str, Path]]) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "params.json").write_text("mine")
    repo = hub.add_folders("evil/sha", tiny["mistral"]["native"])
    repo.reported_sha = "../../../../../victim"  # relative to <cache>/models--evil--sha/snapshots/
    code, _, err = run_cli("pull", "evil/sha")
    assert code == 1
    assert_one_line_error(err, "invalid commit id", "40 hex digits")
    assert (victim / "params.json").read_text() == "mine" and not (victim / "params.json").is_symlink()
    assert sorted(p.name for p in victim.iterdir()) == ["params.json"]
    assert hub.downloads() == []
    assert not (tmp_path / "app" / "models.json").exists()  # refused before anything was recorded


@pytest.mark.parametrize("override", [
    {"lfs": {"size": 1, "sha256": "../../../../victim/x", "pointerSize": 134}},
    {"lfs": {"size": 1, "sha256": "/etc/passwd", "pointerSize": 134}},
])
def test_hub_blob_hash_with_path_parts_is_refused(hub: HubServer, tmp_path: Path, override: dict,
                                                  tiny: dict[str, dict[str, Path]]) -> None:
    repo = hub.add_folders("evil/blob", tiny["mistral"]["native"])
    repo.sibling_overrides = {"consolidated.safetensors": override}
    code, _, err = run_cli("pull", "evil/blob")
    assert code == 1
    assert_one_line_error(err, "invalid sha256 for consolidated.safetensors")
    assert hub.downloads() == []
    assert _files_outside(tmp_path, tmp_path / "hf") == []


@pytest.mark.parametrize("name", ["../params.json", "/etc/passwd", "a/b.json", "..", ".hidden", "x\\y", "a\x00b"])
def test_remote_file_names_with_path_parts_are_refused(name: str) -> None:
    from mistral_chat.errors import DownloadError

    with pytest.raises(DownloadError, match="not a plain file name"):
        download.RemoteFile(name=name, size=1, sha256=None, blob_id="a" * 40)


@pytest.mark.parametrize("revision", ["../../../victim", "/abs", "main/../..", "a//b", ""])
def test_revision_with_path_parts_is_refused(hub: HubServer, tmp_path: Path, revision: str) -> None:
    code, _, err = run_cli("pull", "tiny/native-only", "--revision", revision)
    assert code == 1
    assert_one_line_error(err, "invalid --revision")
    assert hub.requests == []


def test_revision_names_the_hub_uses_are_accepted() -> None:
    for revision in ("main", "v0.3", "refs/pr/1", "a" * 40, "release_2024-05"):
        assert download.check_revision(revision) == revision


# ---- the pulled model answers --------------------------------------------------------------------------------


def test_pulled_model_answers_one_shot_prompt(hub: HubServer, tmp_path: Path) -> None:
    if importlib.util.find_spec("mistral_chat.cli.main") is None:
        pytest.skip("mistral_chat.cli.main is not written yet")
    assert run_cli("pull", "mistral-7b-instruct")[0] == 0
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_chat.cli.main", "--model", "mistral-7b-instruct", "--prompt", "hi",
         "--max-tokens", "3"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
