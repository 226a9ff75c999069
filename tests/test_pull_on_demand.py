"""`mistral-chat --model ALIAS` for a model not yet pulled, as `ollama run` does: a terminal is asked once (with the
download size) and the chat opens on the pulled model; one-shot mode never asks: it says the pull command, or pulls
with --pull. Against the local fake hub (tests/hub_server.py); nothing comes from the internet."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub_server import HubServer
from tiny_models import write_tiny_model

from mistral_chat.cli.main import main
from mistral_chat.models import download
from mistral_chat.models.download import RetryPolicy
from mistral_chat.models.store import list_models

ALIAS = "mistral-7b-instruct"
REPO = "mistralai/Mistral-7B-Instruct-v0.3"
PULL_LINE = f"model '{ALIAS}' is not downloaded: run `mistral-chat pull {ALIAS}` first, or pass --pull"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    tiny = write_tiny_model(tmp_path_factory.mktemp("tiny") / "mistral", "mistral")
    with HubServer() as hub:
        hub.add_folders(REPO, tiny["native"])
        yield hub


def hub_env(server: HubServer, tmp_path: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": server.endpoint, "HF_HOME": str(tmp_path / "hf"), "MISTRAL_CHAT_HOME": str(tmp_path / "app"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN_PATH": str(tmp_path / "hf" / "token")}


@pytest.fixture
def hub(server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """An empty HF cache and app home, pointed at the fake hub."""
    for key, value in hub_env(server, tmp_path).items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "RANK", "WORLD_SIZE", "MISTRAL_CHAT_DEBUG"):
        monkeypatch.delenv(key, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(download, "DEFAULT_RETRY", RetryPolicy(attempts=2, first_delay=0.01))
    server.fail_next(0)
    server.throttle(0)
    server.clear_log()
    return server


class FakeStdin(io.StringIO):
    """Typed answers on a terminal (or a pipe, with tty=False)."""

    def __init__(self, text: str, tty: bool) -> None:
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def tui_opened(monkeypatch: pytest.MonkeyPatch) -> list:
    """Stands in for the TUI: records the options it would have opened with."""
    import mistral_chat.tui.app as tui_app

    opened: list = []
    monkeypatch.setattr(tui_app, "run_tui", lambda options: opened.append(options))
    return opened


def downloaded(hub: HubServer) -> int:
    return len(hub.downloads())


def test_one_shot_without_pull_says_the_pull_command(hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin("", tty=True))
    assert main(["--model", ALIAS, "-p", "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"mistral-chat: error: {PULL_LINE}"]
    assert downloaded(hub) == 0 and list_models() == []


def test_piped_stdin_never_asks(hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """Piped stdin is one-shot mode: no question (stdin is the prompt), even with nothing on disk and no --model."""
    monkeypatch.setattr(sys, "stdin", FakeStdin("hello\n", tty=False))
    assert main(["--device", "cpu"]) == 1
    out = capsys.readouterr()
    assert out.err.strip().splitlines() == [f"mistral-chat: error: {PULL_LINE}"]
    assert "[Y/n]" not in out.err + out.out
    assert downloaded(hub) == 0


def test_one_shot_with_pull_pulls_then_answers(hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin("", tty=False))
    assert main(["--model", ALIAS, "-p", "hi", "--pull", "--device", "cpu", "-n", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.strip()  # the answer
    assert f"downloading {ALIAS} (" in out.err and f"{ALIAS} is ready" in out.err
    assert "[Y/n]" not in out.err
    assert downloaded(hub) > 0
    assert [m.name for m in list_models() if m.ready] == [ALIAS]
    hub.clear_log()  # a second run finds it on disk: no question, no download, no --pull needed
    assert main(["--model", ALIAS, "-p", "hi", "--device", "cpu", "-n", "4"]) == 0
    assert downloaded(hub) == 0


def test_terminal_yes_pulls_then_opens_the_chat(hub: HubServer, monkeypatch: pytest.MonkeyPatch, tui_opened: list,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin("\n", tty=True))  # Enter: yes is the default
    assert main(["--model", ALIAS]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"Download {ALIAS} (") and " now? [Y/n] " in err.splitlines()[0]
    assert f"{ALIAS} is ready" in err
    assert [o.model for o in tui_opened] == [ALIAS]
    assert [m.name for m in list_models() if m.ready] == [ALIAS]


def test_bare_command_with_nothing_on_disk_offers_the_default(hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                                              tui_opened: list,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin("y\n", tty=True))
    assert main([]) == 0
    assert capsys.readouterr().err.startswith(f"Download {ALIAS} (")
    assert [o.model for o in tui_opened] == [ALIAS]


def test_repo_id_is_offered_under_its_alias_and_the_size_is_the_hubs(hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                                                     tui_opened: list,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from mistral_chat.models.pull import download_size, human_bytes

    size = human_bytes(download_size(REPO))
    monkeypatch.setattr(sys, "stdin", FakeStdin("n\n", tty=True))
    assert main(["--model", REPO]) == 1
    assert capsys.readouterr().err.splitlines()[0] == f"Download {ALIAS} ({size}) now? [Y/n] " \
        f"mistral-chat: error: {ALIAS} was not downloaded: run `mistral-chat pull {ALIAS}` to download it"


@pytest.mark.parametrize("answer", ["n\n", "no\n", ""], ids=["n", "no", "eof"])
def test_terminal_no_or_eof_exits_1_with_the_pull_command(hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                                          tui_opened: list, answer: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(answer, tty=True))
    assert main(["--model", ALIAS]) == 1
    err = capsys.readouterr().err
    assert f"run `mistral-chat pull {ALIAS}`" in err.strip().splitlines()[-1]
    assert tui_opened == [] and downloaded(hub) == 0 and list_models() == []


def test_ctrl_c_at_the_question_exits_130(hub: HubServer, monkeypatch: pytest.MonkeyPatch, tui_opened: list,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    class Interrupted(FakeStdin):
        def readline(self, *args: object) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupted("", tty=True))
    assert main(["--model", ALIAS]) == 130
    assert tui_opened == [] and downloaded(hub) == 0


def test_pull_errors_are_pulls_one_line_errors(hub: HubServer, monkeypatch: pytest.MonkeyPatch, tui_opened: list,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "stdin", FakeStdin("y\n", tty=True))
    assert main(["--model", ALIAS]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mistral-chat: error: HF_HUB_OFFLINE is set")
    assert tui_opened == []


def test_models_on_disk_or_folders_are_not_offered(hub: HubServer, monkeypatch: pytest.MonkeyPatch, tui_opened: list,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin("", tty=True))
    folder = str(tmp_path / "nowhere")
    assert main(["--model", "mistral-7b-instrct"]) == 0  # a typo or a missing folder: the chat says what is wrong
    assert main(["--model", folder]) == 0
    assert [o.model for o in tui_opened] == ["mistral-7b-instrct", folder]
    assert main(["--model", "mistral-7b-instrct", "-p", "hi"]) == 1  # one-shot: resolve's own error
    err = capsys.readouterr().err
    assert "did you mean mistral-7b-instruct" in err and "--pull" not in err
    assert "[Y/n]" not in err and downloaded(hub) == 0


def test_question_on_a_real_terminal(hub: HubServer, tmp_path: Path) -> None:
    """The question as a user meets it: a pty, the size on stderr, `n` typed, exit 1 with the pull command."""
    env = {**os.environ, **hub_env(hub, tmp_path), "PYTHONUNBUFFERED": "1"}
    for key in ("HF_HUB_OFFLINE", "HF_TOKEN", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mistral_chat.cli.main", "--model", ALIAS],
                            stdin=terminal, stdout=terminal, stderr=terminal, env=env, close_fds=True)
    os.close(terminal)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.2)[0]:
                try:
                    seen += os.read(controller, 4096)
                except OSError:
                    break

    try:
        read_until(b"[Y/n] ")
        assert f"Download {ALIAS} (".encode() in seen
        os.write(controller, b"n\r")
        read_until(b"to download it")
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    assert f"run `mistral-chat pull {ALIAS}`".encode() in seen
    assert downloaded(hub) == 0
