"""A real terminal: drive `mistral-chat` in tmux with a tiny model, send a prompt, quit, restart, find the chat."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_models import write_tiny_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


def _plain_signals() -> None:
    """Children of a test process can inherit blocked or ignored signals (asyncio, Textual); tmux needs them."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class Tmux:
    def __init__(self, session: str, socket: str) -> None:
        self.session = session
        self.socket = socket

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], check=True,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              start_new_session=True, preexec_fn=_plain_signals).stdout

    def start(self, command: str, env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        self.run("new-session", "-d", "-s", self.session, "-x", "120", "-y", "40",
                 f"env {exports} {command}; sleep 30")

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def wait(self, condition: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if condition(text):
                return text
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; the screen was:\n{text}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def test_chat_in_a_real_terminal(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model", "mistral")["native"]
    home = tmp_path / "home"
    env = {"MISTRAL_CHAT_HOME": str(home), "TERM": "xterm-256color", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = (f"{shlex.quote(sys.executable)} -m mistral_chat.cli.main --model {shlex.quote(str(model))} "
               "--device cpu --max-tokens 12 --context 256")
    tmux = Tmux(f"mc-{uuid.uuid4().hex[:8]}", f"mc-{uuid.uuid4().hex[:8]}")
    try:
        tmux.start(command, env)
        tmux.wait(lambda s: "cpu float32" in s, 90, "the model to load")
        tmux.keys("-l", "Hello from tmux\r")  # text and Enter in one burst, as a paste or a slow link brings them
        screen = tmux.wait(lambda s: "tok/s" in s, 60, "the answer")
        assert "Assistant" in screen and "Hello from tmux" in screen
        tmux.keys("C-q")
        tmux.wait(lambda s: "cpu float32" not in s, 30, "the app to quit")
        tmux.kill()

        tmux.start(command, env)
        screen = tmux.wait(lambda s: "Hello from tmux" in s and "Assistant" in s, 90, "the saved chat")
        assert screen.count("Hello from tmux") >= 2  # the sidebar title and the message
        tmux.keys("C-q")
    finally:
        tmux.kill()


def test_keys_typed_while_the_app_starts_are_kept(tmp_path: Path) -> None:
    """Typed before the first frame: the keys land in the prompt (and Enter sends them), none is lost."""
    env = {"MISTRAL_CHAT_HOME": str(tmp_path / "home"), "TERM": "xterm-256color", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1",  # nothing on disk and offline: the welcome screen, not an offer to download
           "PYTHONPATH": os.pathsep.join(sys.path)}
    tmux = Tmux(f"mc-{uuid.uuid4().hex[:8]}", f"mc-{uuid.uuid4().hex[:8]}")
    try:
        tmux.start(f"{shlex.quote(sys.executable)} -m mistral_chat.cli.main", env)
        tmux.keys("-l", "typed before the first frame")  # the app is still importing
        tmux.wait(lambda s: "Welcome" in s, 30, "the welcome screen (no model)")
        tmux.keys("Escape")
        screen = tmux.wait(lambda s: "typed before the first frame" in s, 30, "the early keys in the prompt")
        assert screen.count("typed before the first frame") == 1
        tmux.keys("-l", " and after\r")
        screen = tmux.wait(lambda s: "You" in s and "typed before the first frame and after" in s, 30,
                           "the message sent")
        tmux.keys("C-q")
    finally:
        tmux.kill()
