"""A progress bar on stderr while a model's weights load: only on a terminal, and only once loading has taken a
second (a model in the page cache of a fast GPU machine loads in about that), so quick loads and pipes stay quiet."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class LoadBar:
    """The `progress(done, total)` callback of `load_model` (tensors read), drawing a transient bar after `delay`
    seconds; use it as a context manager so the bar goes away when loading ends or fails."""

    def __init__(self, label: str, console: Console | None = None, delay: float = 1.0) -> None:
        self.label = label
        self.console = console or Console(stderr=True)
        self.delay = delay
        self.started = time.monotonic()
        self._progress: Progress | None = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        if not self.console.is_terminal:
            return
        if self._progress is None:
            if time.monotonic() - self.started < self.delay:
                return
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                                      console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=total)
        assert self._task is not None
        self._progress.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> "LoadBar":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
