"""Running a typer app as a command: every error a user can cause becomes one line on stderr and an exit status.

typer (>= 0.29) carries its own copy of click: its parser errors are `typer.TyperException`s (click's `UsageError`
family, `exit_code` 2), a question that meets the end of input or Ctrl-C raises `typer.Abort`, and an interrupted
command comes back as exit status 130. Nothing here imports the separate `click` package.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from mistral_chat.errors import MistralChatError

PROG = "mistral-chat"
INTERRUPTED = 130


class _FlagHelp:
    """--help is a flag: help shows no value type for it (typer's own help option would say `<bool>`)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Group(_FlagHelp, TyperGroup):
    """The app's command group (`typer.Typer(cls=Group)`)."""


class Command(_FlagHelp, TyperCommand):
    """One command (`app.command(cls=Command)`)."""


def say(line: str) -> None:
    """One line on stderr (nothing when stderr itself is gone)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


def usage_line(exc: Exception, prog: str = PROG) -> str:
    """A parser error on one line: click's message (with its "Possible options" / "Did you mean" hint) and where
    the usage is."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = " ".join(message.split())  # click's messages may span lines
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or prog
    if getattr(exc, "exit_code", 1) == 2:
        return f"{prog}: error: {message.rstrip('.')} (see `{command} --help`)"
    return f"{prog}: error: {message}"


def stdout_gone() -> None:
    """The reader went away (`| head -1`) or stdout cannot be written: point fd 1 at /dev/null, so that Python's
    flush at exit does not complain a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _interrupted(prog: str) -> int:
    say(f"\n{prog}: interrupted")
    return INTERRUPTED


def run_app(app: typer.Typer, args: list[str], prog: str = PROG, debug: bool = False) -> int:
    """Run `app` on `args`; return the exit status, with any error said on one line (a traceback with --debug)."""
    try:
        result: Any = app(args=args, prog_name=prog, standalone_mode=False)
    except MistralChatError as exc:
        if debug:
            traceback.print_exc()
        say(f"{prog}: error: {exc}")
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort as exc:  # a question met Ctrl-C or the end of input
        if isinstance(exc.__context__, KeyboardInterrupt):
            return _interrupted(prog)
        say(f"\n{prog}: error: no answer (end of input): nothing done")
        return 1
    except typer.TyperException as exc:  # click's parser errors: exit 2
        if debug:
            traceback.print_exc()
        say(usage_line(exc, prog))
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        return _interrupted(prog)
    except BrokenPipeError:
        stdout_gone()
        return 0
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT) and exc.filename is None:
            stdout_gone()  # a write to stdout failed (`> /dev/full`, a full disk): say so, once
            say(f"{prog}: error: cannot write the output ({os.strerror(exc.errno)}): "
                "check where stdout goes (disk space, a closed or full device)")
            return 1
        return _internal(exc, prog, debug)
    except RecursionError as exc:
        return _internal(exc, prog, debug)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line unless --debug
        return _internal(exc, prog, debug)
    if result == INTERRUPTED:  # typer turns a KeyboardInterrupt inside a command into exit status 130
        return _interrupted(prog)
    return int(result) if isinstance(result, int) else 0


def _internal(exc: BaseException, prog: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    say(f"{prog}: internal error: {type(exc).__name__}: {exc} (run with --debug for details, and please report it)")
    return 1
