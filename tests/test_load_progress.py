"""The load bar: drawn on a terminal once loading has taken its delay, never on a pipe, gone when loading ends."""

from __future__ import annotations

import io

from rich.console import Console

from mistral_chat.cli.load_progress import LoadBar


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=80), out


def test_a_slow_load_on_a_terminal_draws_the_bar():
    con, out = console(True)
    with LoadBar("loading m7", con, delay=0.0) as bar:
        for done in range(1, 11):
            bar(done, 10)
    assert "loading m7" in out.getvalue()
    assert bar._progress is None


def test_a_quick_load_or_a_pipe_stays_quiet():
    con, out = console(True)
    with LoadBar("loading m7", con, delay=60.0) as bar:
        bar(5, 10)
    assert out.getvalue() == ""
    con, out = console(False)
    with LoadBar("loading m7", con, delay=0.0) as bar:
        bar(5, 10)
    assert out.getvalue() == ""
