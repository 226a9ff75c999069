"""One-shot answers for shell pipelines: the completion streams to stdout, everything else to stderr.

The CLI builds `OneShotOptions` from its flags and calls `run_one_shot`, which answers through the public API
(`api.Model`: load, `stream`, `stream_ids` for fill-in-the-middle); with `--tp N` the answer comes from a
tensor-parallel run (rank 0 prints it, the followers print nothing)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Any, TextIO

from mistral_chat.api import Model, Reply
from mistral_chat.cli.load_progress import LoadBar
from mistral_chat.cli.terminal import TerminalText, terminal_safe
from mistral_chat.chat.templates import ChatMessage
from mistral_chat.chat.tools import Tool, ToolCall, load_tools, tool_format
from mistral_chat.engine.stats import GenerationStats
from mistral_chat.engine.options import LoadOptions, SamplingParams
from mistral_chat.errors import MistralChatError


@dataclass(frozen=True)
class OneShotOptions:
    """What the command line asks of one answer: the model and how it loads, how to sample, and what to answer
    (a prompt, piped stdin, or code to fill in the middle of) in which output format."""

    model: str | None = None  # a folder, alias or repo id; None: the last used
    load: LoadOptions = field(default_factory=LoadOptions)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    system: str | None = None
    verbose: bool = False  # statistics on stderr
    json_output: bool = False  # one JSON object instead of the streamed text
    tools: Path | None = None  # a JSON file of functions the model may call
    fim_prefix: str | None = None
    fim_suffix: str | None = None
    fim_prefix_file: Path | None = None
    fim_suffix_file: Path | None = None
    pull: bool = False  # download the model first when it is not on disk (otherwise: say the pull command)

    @property
    def fim(self) -> bool:
        return any(x is not None for x in (self.fim_prefix, self.fim_suffix, self.fim_prefix_file,
                                            self.fim_suffix_file))


@dataclass(frozen=True)
class OneShotRequest:
    """What to answer: a prompt (with optional tools), or code to fill in the middle of."""

    text: str | None = None
    tools: tuple[Tool, ...] = ()
    fim: tuple[str, str] | None = None  # (prefix, suffix)
    system: str | None = None


def valid_text(text: str, what: str) -> str:
    """`text` as valid Unicode: bytes that were not UTF-8 (in argv they arrive as lone surrogates) become U+FFFD,
    with a warning that names `what`."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    raw = text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "replace")
    print(f"mistral-chat: warning: {what} is not valid UTF-8: the bytes that are not were replaced by \ufffd",
          file=sys.stderr)
    return raw.decode("utf-8", "replace")


def _only_escapes(text: str) -> bool:
    return all(not 0xD800 <= ord(ch) <= 0xDFFF or 0xDC80 <= ord(ch) <= 0xDCFF for ch in text)


def read_stdin(stdin: TextIO) -> str:
    """All of piped stdin, decoded as UTF-8; bytes that are not UTF-8 are replaced (and said so)."""
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes under it (tests)
        return valid_text(stdin.read(), "stdin")
    raw = buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        print("mistral-chat: warning: stdin is not valid UTF-8: the bytes that are not were replaced by \ufffd",
              file=sys.stderr)
        return raw.decode("utf-8", "replace")


def read_prompt(prompt: str | None, stdin: TextIO) -> str:
    """--prompt, piped stdin, or both (stdin after the prompt, as `llm` and `ollama run` do); an empty or blank
    prompt is refused."""
    piped = None if stdin.isatty() else read_stdin(stdin)
    if prompt is None and piped is None:
        raise MistralChatError("no prompt: pass --prompt TEXT or pipe text into mistral-chat")
    if prompt is not None:
        prompt = valid_text(prompt, "--prompt")
    text = "\n\n".join(part for part in (prompt, piped) if part)
    if not text.strip():
        where = "--prompt and stdin are" if prompt is not None and piped is not None else \
            "--prompt is" if prompt is not None else "stdin is"
        raise MistralChatError(f"empty prompt: {where} empty or blank: pass the text to answer with --prompt TEXT "
                               "or pipe it in")
    return text


def _text_option(text: str | None, path: Path | None) -> str | None:
    if path is None:
        return text
    try:
        return Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MistralChatError(f"cannot read {path} ({exc}): check the path") from exc


def read_fim(opts: OneShotOptions, stdin: TextIO) -> tuple[str, str]:
    """Code before the cursor (--fim-prefix[-file] or piped stdin) and after it (--fim-suffix[-file], may be empty)."""
    prefix = _text_option(opts.fim_prefix, opts.fim_prefix_file)
    suffix = _text_option(opts.fim_suffix, opts.fim_suffix_file) or ""
    if prefix is None:
        if stdin.isatty():
            raise MistralChatError("fill-in-the-middle needs the code before the cursor: pass --fim-prefix TEXT, "
                                   "--fim-prefix-file FILE or pipe it in")
        prefix = read_stdin(stdin)
    return valid_text(prefix, "--fim-prefix"), valid_text(suffix, "--fim-suffix")


def read_request(opts: OneShotOptions, stdin: TextIO) -> OneShotRequest:
    """Everything the answer needs from the command line and stdin, read before the model loads."""
    if opts.fim:
        if opts.tools is not None:
            raise MistralChatError("--tools and --fim-prefix/--fim-suffix do not go together: use one of them")
        return OneShotRequest(fim=read_fim(opts, stdin))
    system = valid_text(opts.system, "--system") if opts.system else None
    tools = tuple(load_tools(opts.tools)) if opts.tools is not None else ()
    return OneShotRequest(text=read_prompt(opts.prompt, stdin), tools=tools, system=system)


def format_stats(stats: GenerationStats) -> str:
    return (f"prompt {stats.prompt_tokens} tokens ({stats.prefilled_tokens} prefilled), "
            f"generated {stats.generated_tokens}, first token {stats.time_to_first_token * 1000:.0f} ms, "
            f"{stats.tokens_per_second:.1f} tokens/s, finish: {stats.finish_reason}"
            + (f", drafts accepted {stats.accepted_tokens}/{stats.drafted_tokens} ({stats.acceptance:.0%})"
               if stats.drafted_tokens else ""))


def run_one_shot(opts: OneShotOptions) -> None:
    """Load the model (`api.Model`, as every front end does), answer the request and print the answer; with
    `--tp N` the followers print nothing."""
    request = read_request(opts, sys.stdin)
    if "RANK" not in os.environ:  # never asks: pulls with --pull, else says the pull command (torchrun: as given)
        from mistral_chat.cli.models import pull_on_demand

        opts = dataclasses.replace(opts, model=pull_on_demand(opts.model, interactive=False, pull=opts.pull))
    with LoadBar(f"loading {Path(str(opts.model)).name if opts.model else 'the model'}") as bar:
        model = Model.from_options(opts.model, opts.load, progress=bar)
    if model is None:  # a torchrun follower, once rank 0 is done
        return
    with model:
        announce_compile(bool(model.loaded is not None and model.loaded.compile))
        if opts.verbose:
            loaded = model.loaded
            assert loaded is not None
            where = f"on {model.session.world} ranks ({loaded.device.type})" if model.tensor_parallel > 1 \
                else f"on {loaded.device}"
            sys.stderr.write(f"loaded {loaded.name} {where} as {model.dtype} in {loaded.load_seconds:.1f} s\n")
        answer_once(opts, model, request)


def answer_once(opts: OneShotOptions, model: Model, request: OneShotRequest) -> None:
    """Encode the request, generate, and print: streamed text, tool calls as JSON, or one JSON object."""
    params = opts.sampling
    if request.fim is not None:
        pieces = model.stream_ids(model.tokenizer.encode_fim(*request.fim), params)
    else:
        messages = ([ChatMessage("system", request.system)] if request.system else [])
        messages.append(ChatMessage("user", request.text or ""))
        if request.tools:
            tool_format(model.tokenizer.raw)  # a tokenizer without function calling: say so, as --tools asked
        pieces = model.stream(messages, request.tools, params=params)
    if opts.json_output or request.tools:
        text = "".join(pieces)
        reply = model.last_reply
        assert reply is not None and reply.stats is not None
        calls = _tool_calls(reply) if request.tools else None
        if opts.json_output:
            print(json.dumps(answer_json(model.name, text, calls, reply.stats), ensure_ascii=False))
        elif calls is not None:
            print(json.dumps([c.to_json() for c in calls], ensure_ascii=False, indent=2))
        else:
            shown = text if not text.endswith("\n") else text[:-1]
            print(terminal_safe(shown) if _is_terminal(sys.stdout) else shown)
        sys.stdout.flush()
    else:
        stream_answer(pieces, sys.stdout)
    if opts.verbose:
        assert model.last_reply is not None and model.last_reply.stats is not None
        print(format_stats(model.last_reply.stats), file=sys.stderr)


def _tool_calls(reply: Reply) -> list[ToolCall] | None:
    """The reply's calls (None: it made none), or None after saying why its calls cannot be read (the raw text is
    then shown as the answer)."""
    if reply.tool_call_error:
        print(f"mistral-chat: {reply.tool_call_error}", file=sys.stderr)
        return None
    return list(reply.tool_calls) if reply.finish_reason == "tool_calls" else None


def answer_json(model: str, text: str, calls: list[ToolCall] | None, stats: GenerationStats) -> dict[str, Any]:
    return {
        "model": model,
        "text": text,
        "tool_calls": [c.to_json() for c in calls] if calls is not None else None,
        "finish_reason": "tool_calls" if calls else stats.finish_reason,
        "prompt_tokens": stats.prompt_tokens,
        "prefilled_tokens": stats.prefilled_tokens,
        "generated_tokens": stats.generated_tokens,
        "time_to_first_token_s": round(stats.time_to_first_token, 4),
        "tokens_per_second": round(stats.tokens_per_second, 2),
    }


def announce_compile(compiles: bool) -> None:
    """Say that decode compiles (under --tp, where the plan compiles it), since the first run on a machine takes
    minutes."""
    if compiles:
        print("mistral-chat: compiling the model for these GPUs (a few minutes the first time, cached afterwards; "
              "--no-compile skips it)", file=sys.stderr)


def _is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (OSError, ValueError, AttributeError):
        return False


def stream_answer(answer: Iterable[str], out: TextIO) -> str:
    """Write the answer's pieces to `out` as they arrive, flushing each; end with a newline. On a terminal, control
    sequences in the answer are not written (they would retitle or recolour it); a pipe or file gets every byte."""
    screen = TerminalText() if _is_terminal(out) else None
    pieces = []
    for delta in answer:
        pieces.append(delta)
        out.write(screen.feed(delta) if screen is not None else delta)
        out.flush()
    answer = "".join(pieces)
    if not answer.endswith("\n"):
        out.write("\n")
        out.flush()
    return answer
