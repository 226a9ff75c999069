"""The `pull`, `list`, `show` and `rm` commands. `register(app)` adds them to the main typer app."""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import TextIO

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mistral_chat.errors import DownloadError, MistralChatError, ModelNotFoundError
from mistral_chat.models.catalogue import CATALOGUE
from mistral_chat.models.progress import progress_for
from mistral_chat.models.files import FormatChoice
from mistral_chat.models.pull import PullResult, download_size, human_bytes, human_count, pull_model
from mistral_chat.models.store import describe_model, list_models, plan_removal


class FormatOption(str, Enum):
    auto = "auto"
    native = "native"
    hf = "hf"


class PullInterrupted(DownloadError):
    """Ctrl-C during a pull: the partial files stay and the next pull resumes them."""

    exit_code = 130


def _console() -> Console:
    """stdout; piped output is not wrapped or truncated, so that scripts see whole names."""
    console = Console()
    return console if console.is_terminal else Console(width=1000)


def human_context(n: int | None) -> str:
    """A context length as people write it: 4096, 32K, 128K (exact powers of two of 1024 and more in K)."""
    if n is None:
        return "?"
    if n < 10_000:
        return str(n)
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % 1024 == 0:
        return f"{n >> 10}K"
    return human_count(n)


def _text(value: object) -> Text:
    """Data (a model name, a path, a repo id) as plain text: never read as Rich markup."""
    return Text(str(value))


def _say(console: Console, line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def human_age(when: float | None, now: float | None = None) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, (now or time.time()) - when)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now"


def pull(
    model: str = typer.Argument(..., help="Catalogue alias (mistral-7b-instruct), repo id owner/name, or a folder."),
    revision: str = typer.Option("main", "--revision", help="Branch, tag or commit of the repository."),
    format: FormatOption = typer.Option(FormatOption.auto, "--format", help="auto prefers native files."),
    token: str | None = typer.Option(None, "--token",
                                     help="Hugging Face token (default: HF_TOKEN or `hf auth login`)."),
) -> None:
    """Download a model's weights (one format, resumable) or register a local model folder."""
    console = _console()
    result = fetch(model, console, revision=revision, fmt=format.value, token=token)
    say_pulled(console, result)
    _say(console, f"chat with it: mistral-chat --model {result.name}")


def fetch(model: str, console: Console, revision: str = "main", fmt: FormatChoice = "auto",
          token: str | None = None) -> PullResult:
    """`pull_model` with pull's progress bar on `console` (when it is a terminal); Ctrl-C says how to resume."""
    progress = progress_for(console, model)
    try:
        return pull_model(model, revision=revision, fmt=fmt, token=token, progress=progress)
    except KeyboardInterrupt:
        raise PullInterrupted(f"pull of {model} interrupted: run `mistral-chat pull {model}` again to resume") from None


def say_pulled(console: Console, result: PullResult) -> None:
    if result.repo_id is None:
        _say(console, f"registered {result.name} ({result.format}, {human_bytes(result.total_bytes)}) "
                      f"at {result.path}")
    else:
        downloaded = result.downloaded_bytes
        fetched = f", {human_bytes(downloaded)} downloaded" if downloaded else ", already on disk"
        _say(console, f"{result.name} is ready ({result.format}, {human_bytes(result.total_bytes)}{fetched}) "
                      f"at {result.path}")


def pull_on_demand(model: str | None, *, interactive: bool, pull: bool) -> str | None:
    """The model to chat with, pulled first when it is a hub model not yet on disk (as `ollama run` does):
    `pull` (--pull) downloads it, `interactive` (a terminal) asks first, and otherwise the error says the pull
    command. Returns `model`, or the name pulled (the catalogue's default when nothing was on disk)."""
    from mistral_chat.service.loading import model_to_pull

    name = model_to_pull(model)
    if name is None:
        return model
    command = f"mistral-chat pull {name}"
    if not pull and not interactive:
        raise ModelNotFoundError(f"model {name!r} is not downloaded: run `{command}` first, or pass --pull")
    err = Console(stderr=True)
    size = human_bytes(download_size(name))
    if pull:
        _say(err, f"downloading {name} ({size})")
    elif not ask(f"Download {name} ({size}) now?", default=True, out=sys.stderr):
        raise MistralChatError(f"{name} was not downloaded: run `{command}` to download it")
    result = fetch(name, err)
    say_pulled(err, result)
    return result.name


def list_command(
    catalogue: bool = typer.Option(False, "--catalogue", help="List the aliases `pull` knows instead.", metavar=""),
) -> None:
    """List the models on disk: name, repository, format, size, parameters, context length, last use."""
    console = _console()
    if catalogue:
        table = Table("alias", "repository", "description", box=None)
        for entry in CATALOGUE.values():
            table.add_row(_text(entry.alias), _text(entry.repo_id), _text(entry.description))
        console.print(table)
        return
    rows = list_models()
    if not rows:
        _say(console, "no models yet: run `mistral-chat pull mistral-7b-instruct` (or `list --catalogue`)")
        return
    table = Table("name", "repo", "format", "size", "params", "context", "last used", "status", box=None)
    for r in rows:
        status = "ready" if r.ready else f"incomplete: run `mistral-chat pull {r.name}`"
        repo = r.repo_id or str(r.path)
        table.add_row(*map(_text, (r.name, repo, r.format or "?", human_bytes(r.size_on_disk),
                                   human_count(r.parameters), human_context(r.context_length), human_age(r.last_used),
                                   status)))
    console.print(table, soft_wrap=True)


def show(model: str = typer.Argument(..., help="Name, alias, repo id or folder.")) -> None:
    """Show a model's architecture, shape, tokenizer, instruct format and files."""
    details = describe_model(model)
    s = details.summary
    console = _console()
    rows: list[tuple[str, object]] = [("name", s.name), ("source", s.source)]
    if s.repo_id:
        rows.append(("repo", s.repo_id))
    if details.revision:
        rows.append(("revision", f"{details.revision} ({details.commit})"))
    rows += [("path", s.path), ("status", "ready" if s.ready else f"incomplete: run `mistral-chat pull {s.name}`"),
             ("format", s.format or "?"), ("architecture", details.architecture or "?"),
             ("parameters", human_count(s.parameters))]
    rows += [(key, "none" if value is None else value) for key, value in details.config.items()]
    rows += [("tokenizer", details.tokenizer or "?"), ("instruct format", details.instruct_format or "?"),
             ("size on disk", human_bytes(s.size_on_disk))]
    table = Table(show_header=False, box=None)
    for key, value in rows:
        table.add_row(_text(key), _text(value))
    console.print(table, highlight=False)
    files = Table("file", "size", box=None)
    for name, size in details.files:
        files.add_row(_text(name), _text(human_bytes(size) if size >= 0 else "missing"))
    console.print(files, highlight=False)


def _registered_name(model: str) -> str:
    """`model`, or the name of the registered folder it is the path of (the path that `list` shows)."""
    if not any(sep in model for sep in ("/", "\\", "~")) and not Path(model).exists():
        return model
    try:
        target = Path(model).expanduser().resolve()
    except (OSError, RuntimeError):
        return model
    for row in list_models():
        if row.repo_id is None and row.path is not None:
            try:
                if Path(row.path).expanduser().resolve() == target:
                    return row.name
            except (OSError, RuntimeError):
                continue
    return model


def ask(question: str, default: bool = False, out: TextIO | None = None) -> bool:
    """A yes/no question on `out` (stdout by default; stderr where stdout may be piped), answered on stdin;
    Enter gives `default`, the end of input is a no, Ctrl-C stops the command."""
    out = out or sys.stdout
    out.write(f"{question} [Y/n] " if default else f"{question} [y/N]: ")
    out.flush()
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        out.write("\n")
        raise
    if not answer:  # end of input: nobody answered
        out.write("\n")
        return False
    return answer.strip().lower() in (("", "y", "yes") if default else ("y", "yes"))


def rm(
    model: str = typer.Argument(..., help="Name, alias, repo id, or the path of a registered folder."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.", metavar=""),
) -> None:
    """Remove a model: delete a pulled repo from the Hugging Face cache, or forget a registered folder."""
    plan = plan_removal(_registered_name(model))
    freed = f" (frees {human_bytes(plan.freed_bytes)})" if plan.freed_bytes else ""
    console = Console()
    if not yes and not ask(f"Remove {plan.name}: {plan.description}{freed}. Go ahead?"):
        _say(console, "nothing removed")
        raise typer.Exit(1)
    plan.execute()
    _say(console, f"removed {plan.name}{freed}")


def register(app: typer.Typer) -> None:
    """Add `pull`, `list`, `show` and `rm` to the main app."""
    from mistral_chat.cli.runner import Command

    app.command("pull", cls=Command)(pull)
    app.command("list", cls=Command)(list_command)
    app.command("show", cls=Command)(show)
    app.command("rm", cls=Command)(rm)


def run_command(app: typer.Typer, args: list[str] | None = None) -> int:
    """Run `app` as the main CLI does: an error a user can cause becomes one line on stderr and an exit status."""
    from mistral_chat.cli.runner import run_app

    return run_app(app, list(args or []))


__all__ = ["register", "run_command", "pull", "fetch", "pull_on_demand", "list_command", "show", "rm",
           "PullInterrupted"]
