"""The `mistral-chat` command: the chat TUI, one-shot prompts for scripts, and model management."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from mistral_chat import __version__
from mistral_chat.cli import options as opt
from mistral_chat.cli.runner import PROG, Command, Group, run_app, say, stdout_gone

log = logging.getLogger("mistral_chat")

app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Chat with Mistral-family models on your own GPU or CPU.\n\n"
         "With no command: opens the chat TUI on a terminal, or answers --prompt / piped stdin once and exits.",
)




def flag(*names: str, help: str, **kwargs: Any) -> Any:
    """A boolean flag: --help shows no value type for it (typer would print `<bool>`)."""
    return typer.Option(False, *names, help=help, metavar="", **kwargs)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mistral-chat {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    model: Optional[str] = opt.MODEL,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p",
                                         help="Answer this once and exit (piped stdin is appended)."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    max_tokens: int = opt.MAX_TOKENS,
    temperature: float = opt.TEMPERATURE,
    top_p: float = opt.TOP_P,
    top_k: int = opt.TOP_K,
    seed: Optional[int] = opt.SEED,
    min_p: float = opt.MIN_P,
    repetition_penalty: float = opt.REPETITION_PENALTY,
    presence_penalty: float = opt.PRESENCE_PENALTY,
    stop: Optional[list[str]] = opt.STOP,
    speculate: Optional[int] = opt.SPECULATE,
    json_output: bool = flag("--json", help="One-shot: print one JSON object (text, tokens, timings, finish reason)."),
    tools: Optional[Path] = typer.Option(None, "--tools", help="JSON file of functions the model may call; "
                                                                 "one-shot prints calls as JSON."),
    fim_prefix: Optional[str] = typer.Option(None, "--fim-prefix", help="Fill in the middle: code before the cursor."),
    fim_suffix: Optional[str] = typer.Option(None, "--fim-suffix", help="Fill in the middle: code after the cursor."),
    fim_prefix_file: Optional[Path] = typer.Option(None, "--fim-prefix-file", help="Read the code before the cursor."),
    fim_suffix_file: Optional[Path] = typer.Option(None, "--fim-suffix-file", help="Read the code after the cursor."),
    lora: Optional[Path] = opt.LORA,
    lora_scale: float = opt.LORA_SCALE,
    device: str = opt.DEVICE,
    dtype: str = opt.DTYPE,
    context: Optional[int] = opt.CONTEXT,
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel processes, one per GPU."),
    quantize: Optional[str] = opt.QUANTIZE,
    no_compile: bool = flag("--no-compile", help="Run eager on GPU instead of compiling decode into CUDA graphs."),
    pull: bool = flag("--pull", help="Download the model first if it is not on disk (without it, a terminal asks "
                                     "and one-shot mode stops)."),
    verbose: bool = flag("--verbose", "-v", help="Statistics and progress on stderr."),
    debug: bool = flag("--debug", help="Full tracebacks and debug logs."),
    version: bool = flag("--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: one rank of a TP run
        tp = int(os.environ["WORLD_SIZE"])
    load = opt.load_options(device, dtype, context, quantize, lora, lora_scale, tp, compile=not no_compile)
    sampling = opt.sampling_params(temperature, top_p, top_k, max_tokens, seed, min_p, repetition_penalty,
                                   presence_penalty, stop, speculate)
    fim = any(x is not None for x in (fim_prefix, fim_suffix, fim_prefix_file, fim_suffix_file))
    if prompt is None and not fim and sys.stdin.isatty():
        if tp > 1 and os.environ.get("RANK", "0") != "0":  # a torchrun follower of a TUI on rank 0
            from mistral_chat.service.loading import prepare_compile
            from mistral_chat.service.tensor_parallel import start_parallel

            start_parallel(model, prepare_compile(load))
            return
        if "RANK" not in os.environ:  # not yet on disk: ask, pull, then chat (torchrun ranks find it or fail)
            from mistral_chat.cli.models import pull_on_demand

            model = pull_on_demand(model, interactive=True, pull=pull)
        from mistral_chat.tui.app import AppOptions, run_tui

        run_tui(AppOptions(model=model, load=load, sampling=sampling, system_prompt=system or "",
                           tools_path=str(tools.expanduser().resolve()) if tools else ""))
        return
    from mistral_chat.oneshot import OneShotOptions, run_one_shot

    opts = OneShotOptions(model=model, load=load, sampling=sampling, prompt=prompt, system=system, verbose=verbose,
                          json_output=json_output, tools=tools, fim_prefix=fim_prefix, fim_suffix=fim_suffix,
                          fim_prefix_file=fim_prefix_file, fim_suffix_file=fim_suffix_file, pull=pull)
    try:
        run_one_shot(opts)
    except BrokenPipeError:  # caught here: typer would turn it into exit status 1
        stdout_gone()


def _register_commands() -> None:
    from mistral_chat.bench.command import bench_command
    from mistral_chat.cli import batch, serve
    from mistral_chat.cli.models import register

    register(app)
    app.command("bench", cls=Command)(bench_command)
    batch.register(app)
    serve.register(app)


class _PlainFormatter(logging.Formatter):
    """-v: progress lines as plain text (`kernel plan: ...`); warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{PROG}: {record.levelname.lower()}: {text}"
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes each line to sys.stderr as it is then (not as it was when the handler was made)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging(debug: bool, verbose: bool) -> Callable[[], None]:
    """--debug: every logger's lines with level and name; otherwise the app's own lines, plain (INFO with -v).
    Returns what undoes it, so that main() leaves the logging set-up as it found it."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if debug
                         else _PlainFormatter("%(message)s"))
    root, app_log = logging.getLogger(), logging.getLogger("mistral_chat")
    levels = root.level, app_log.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    app_log.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        app_log.setLevel(levels[1])

    return undo


def _stdout_is_open() -> bool:
    """False when the command was started with stdout closed (`mistral-chat ... >&-`)."""
    if sys.stdout is None:
        return False
    try:
        os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point: turns every error a user can cause into one line on stderr and an exit status (2 for a
    command-line mistake, 130 for Ctrl-C)."""
    args = sys.argv[1:] if argv is None else argv
    if argv is None and not _stdout_is_open():
        stdout_gone()  # hold fd 1, so that no file opened later takes its place
        say(f"{PROG}: error: stdout is closed: redirect it to a file or /dev/null instead of closing it")
        return 1
    debug = "--debug" in args or os.environ.get("MISTRAL_CHAT_DEBUG") == "1"
    undo_logging = _configure_logging(debug, "--verbose" in args or "-v" in args)
    try:
        _register_commands()
        return run_app(app, args, PROG, debug)
    finally:
        undo_logging()


if __name__ == "__main__":
    sys.exit(main())
