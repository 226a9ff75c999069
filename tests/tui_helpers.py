"""Shared pieces of the TUI tests: a tiny model, an app on a temporary database, waiting for the engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from textual.pilot import Pilot

from mistral_chat.chat.store import ChatStore
from mistral_chat.engine.options import LoadOptions, SamplingParams
from mistral_chat.tui.app import AppOptions, MistralChatApp

REPO_THEMES = Path(__file__).resolve().parent.parent / "themes"


def make_app(db: Path, model: Path | None, *, context: int | None = 256, max_tokens: int = 12,
             system_prompt: str = "", session_factory=None) -> MistralChatApp:
    options = AppOptions(model=str(model) if model else None, load=LoadOptions(device="cpu", context_length=context),
                         sampling=SamplingParams(max_tokens=max_tokens), system_prompt=system_prompt,
                         theme_dirs=[REPO_THEMES])

    def resolve(name: str | None) -> tuple[Path, str] | None:
        return (Path(name), Path(name).name) if name else None

    extra = {"session_factory": session_factory} if session_factory else {}
    return MistralChatApp(options, ChatStore(db), resolve_model=resolve, **extra)


async def wait_for(pilot: Pilot, condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if not pilot.app.is_running:
            raise AssertionError(f"the app stopped while waiting for {what or condition}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await pilot.pause(0.05)


async def open_settings(pilot: Pilot):
    """Ctrl+S from the chat: the settings screen, mounted."""
    await pilot.press("ctrl+s")
    await pilot.pause()
    return pilot.app.screen


class SlowSession:
    """A stand-in session that streams "word0 word1 ..." slowly, for stop and save-while-streaming tests."""

    def __init__(self, loaded: object, context_length: int | None, delay: float = 0.05, words: int = 200) -> None:
        from mistral_chat.engine.generate import GenerationStats

        self.context_length = context_length or 512
        self.stats = GenerationStats()
        self.delay = delay
        self.words = words

    def generate(self, prompt_ids, params=None, cancel=None):
        from mistral_chat.engine.generate import GenerationStats

        self.stats = GenerationStats(prompt_tokens=len(prompt_ids), prefilled_tokens=len(prompt_ids),
                                     finish_reason="length")
        for i in range(self.words):
            if cancel is not None and cancel.is_set():
                self.stats.finish_reason = "cancelled"
                return
            time.sleep(self.delay)
            self.stats.generated_tokens += 1
            yield f"word{i} "

    def reset(self) -> None:
        pass


class FastSession(SlowSession):
    """Streams `words` tokens as fast as the loop runs (a stand-in for an engine faster than the screen); `texts`
    replaces the "wordN " tokens."""

    def __init__(self, loaded: object, context_length: int | None, words: int = 2000,
                 texts: list[str] | None = None, pause_every: int = 0, pause: float = 0.0) -> None:
        super().__init__(loaded, context_length, delay=0.0, words=words)
        self.texts = texts
        self.pause_every, self.pause = pause_every, pause  # e.g. 20 tokens then 10 ms: ~2000 tok/s

    def generate(self, prompt_ids, params=None, cancel=None):
        from mistral_chat.engine.generate import GenerationStats

        texts = self.texts if self.texts is not None else [f"word{i} " for i in range(self.words)]
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids), prefilled_tokens=len(prompt_ids),
                                     finish_reason="length")
        start = time.perf_counter()
        for text in texts:
            if cancel is not None and cancel.is_set():
                self.stats.finish_reason = "cancelled"
                return
            self.stats.generated_tokens += 1
            yield text
            if self.pause_every and self.stats.generated_tokens % self.pause_every == 0:
                time.sleep(self.pause)
        self.stats.decode_seconds = time.perf_counter() - start


def record_notes(app) -> list[str]:
    """Every notification's text (app._notifications forgets them after their timeout, which a busy CI passes)."""
    notes: list[str] = []
    notify = app.notify

    def recording(message, *args, **kwargs):
        notes.append(str(message))
        return notify(message, *args, **kwargs)

    app.notify = recording
    return notes


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the model registry, exports and user themes of the tests out of the real user folders."""
    home = tmp_path / "home"
    monkeypatch.setenv("MISTRAL_CHAT_HOME", str(home))
    return home


def welcome_shown(app) -> bool:
    """The welcome screen is up and composed (it comes once the app found no model to open, after the first frame)."""
    from mistral_chat.tui.screens.welcome import WelcomeScreen

    return isinstance(app.screen, WelcomeScreen) and bool(app.screen.query("#welcome-text"))


async def close_welcome(pilot: Pilot) -> None:
    """Wait for the welcome screen, then close it."""
    await wait_for(pilot, lambda: welcome_shown(pilot.app), timeout=10, what="the welcome screen")
    await pilot.press("escape")
    await pilot.pause()
