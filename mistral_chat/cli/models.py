"""The `pull`, `list`, `show` and `rm` commands. `register(app)` adds them to the main typer app."""

from __future__ import annotations

import time
from enum import Enum

import click
import typer
from rich.console import Console
from rich.table import Table

from mistral_chat.errors import DownloadError, MistralChatError
from mistral_chat.models.catalogue import CATALOGUE
from mistral_chat.models.progress import progress_for
from mistral_chat.models.pull import human_bytes, pull_model
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


def human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


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
    token: str | None = typer.Option(None, "--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`)."),
) -> None:
    """Download a model's weights (one format, resumable) or register a local model folder."""
    console = _console()
    progress = progress_for(console, model)
    try:
        result = pull_model(model, revision=revision, fmt=format.value, token=token, progress=progress)
    except KeyboardInterrupt:
        raise PullInterrupted(f"pull of {model} interrupted: run `mistral-chat pull {model}` again to resume") from None
    if result.repo_id is None:
        console.print(f"registered {result.name} ({result.format}, {human_bytes(result.total_bytes)}) at {result.path}",
                      highlight=False)
    else:
        fetched = f", {human_bytes(result.downloaded_bytes)} downloaded" if result.downloaded_bytes else ", already on disk"
        console.print(f"{result.name} is ready ({result.format}, {human_bytes(result.total_bytes)}{fetched}) "
                      f"at {result.path}", highlight=False, soft_wrap=True)
    console.print(f"chat with it: mistral-chat --model {result.name}", highlight=False)


def list_command(
    catalogue: bool = typer.Option(False, "--catalogue", help="List the aliases `pull` knows instead."),
) -> None:
    """List the models on disk: name, repository, format, size, parameters, context length, last use."""
    console = _console()
    if catalogue:
        table = Table("alias", "repository", "description", box=None)
        for entry in CATALOGUE.values():
            table.add_row(entry.alias, entry.repo_id, entry.description)
        console.print(table)
        return
    rows = list_models()
    if not rows:
        console.print("no models yet: run `mistral-chat pull mistral-7b-instruct` (or `list --catalogue`)")
        return
    table = Table("name", "repo", "format", "size", "params", "context", "last used", "status", box=None)
    for r in rows:
        status = "ready" if r.ready else f"incomplete: run `mistral-chat pull {r.name}`"
        repo = r.repo_id or str(r.path)
        table.add_row(r.name, repo, r.format or "?", human_bytes(r.size_on_disk), human_count(r.parameters),
                      human_count(r.context_length), human_age(r.last_used), status)
    console.print(table, soft_wrap=True)


def show(model: str = typer.Argument(..., help="Name, alias, repo id or folder.")) -> None:
    """Show a model's architecture, shape, tokenizer, instruct format and files."""
    details = describe_model(model)
    s = details.summary
    console = _console()
    table = Table(show_header=False, box=None)
    table.add_row("name", s.name)
    table.add_row("source", s.source)
    if s.repo_id:
        table.add_row("repo", s.repo_id)
    if details.revision:
        table.add_row("revision", f"{details.revision} ({details.commit})")
    table.add_row("path", str(s.path))
    table.add_row("status", "ready" if s.ready else f"incomplete: run `mistral-chat pull {s.name}`")
    table.add_row("format", s.format or "?")
    table.add_row("architecture", details.architecture or "?")
    table.add_row("parameters", human_count(s.parameters))
    for key, value in details.config.items():
        table.add_row(key, "none" if value is None else str(value))
    table.add_row("tokenizer", details.tokenizer or "?")
    table.add_row("instruct format", details.instruct_format or "?")
    table.add_row("size on disk", human_bytes(s.size_on_disk))
    console.print(table, highlight=False)
    files = Table("file", "size", box=None)
    for name, size in details.files:
        files.add_row(name, human_bytes(size) if size >= 0 else "missing")
    console.print(files, highlight=False)


def rm(
    model: str = typer.Argument(..., help="Name, alias or repo id."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove a model: delete a pulled repo from the Hugging Face cache, or forget a registered folder."""
    plan = plan_removal(model)
    freed = f" (frees {human_bytes(plan.freed_bytes)})" if plan.freed_bytes else ""
    if not yes and not typer.confirm(f"{plan.description}{freed}?", default=False):
        Console().print("nothing removed")
        raise typer.Exit(1)
    plan.execute()
    Console().print(f"removed {plan.name}{freed}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `pull`, `list`, `show` and `rm` to the main app."""
    app.command("pull")(pull)
    app.command("list")(list_command)
    app.command("show")(show)
    app.command("rm")(rm)


def run_command(app: typer.Typer, args: list[str] | None = None) -> int:
    """Run `app` as the main CLI does: a MistralChatError becomes one line on stderr and its exit code."""
    try:
        result = app(args=args, standalone_mode=False)  # click returns typer.Exit's code here instead of raising
    except MistralChatError as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", markup=False, highlight=False)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return result if isinstance(result, int) else 0


__all__ = ["register", "run_command", "pull", "list_command", "show", "rm", "PullInterrupted"]
