"""Progress of a pull: one display for all files (total bytes, speed, ETA), or none at all.

huggingface_hub's `http_get` reports through a tqdm-like object it builds from `tqdm_class(**kwargs)`;
`PullProgress.bar_factory` hands it a small adapter that forwards byte counts here.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.table import Column
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class PullProgress:
    """Silent progress: the base class, used when stdout is not a terminal. Subclasses draw or observe."""

    def start(self, total_bytes: int, done_bytes: int) -> None:
        """Called once, before the first byte, with the bytes to fetch in all and those already on disk."""

    def file_started(self, name: str) -> None:
        """Called as each file starts downloading."""

    def advance(self, n_bytes: int) -> None:
        """Called for each chunk written (negative when a restart throws bytes away)."""

    def stop(self) -> None:
        """Called once at the end, on success or failure."""

    def bar_factory(self) -> Callable[..., "_HubBar"]:
        return lambda **_: _HubBar(self)


class _HubBar:
    """What huggingface_hub's http_get needs of a tqdm bar: a context manager with update()."""

    def __init__(self, progress: PullProgress) -> None:
        self._progress = progress

    def __enter__(self) -> "_HubBar":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def update(self, n: int | float = 1) -> None:
        self._progress.advance(int(n))

    def close(self) -> None:
        return None


class RichPullProgress(PullProgress):
    """One rich progress bar across all files of a pull."""

    def __init__(self, console: Console, label: str) -> None:
        self._label = label
        self._progress = Progress(
            TextColumn("[bold]{task.description}",
                       table_column=Column(max_width=32, no_wrap=True, overflow="ellipsis")),
            BarColumn(bar_width=20),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None

    def start(self, total_bytes: int, done_bytes: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task(self._label, total=total_bytes, completed=done_bytes, file="")

    def file_started(self, name: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, file=name)

    def advance(self, n_bytes: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n_bytes)

    def stop(self) -> None:
        self._progress.stop()


def progress_for(console: Console, label: str) -> PullProgress:
    """A drawn display when the console is a terminal, silence otherwise."""
    return RichPullProgress(console, label) if console.is_terminal else PullProgress()


__all__ = ["PullProgress", "RichPullProgress", "progress_for"]
