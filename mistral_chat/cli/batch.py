"""`mistral-chat batch IN.jsonl [-o OUT.jsonl]`: many requests answered together (continuous batching).

One request a line: {"id": ..., "messages": [...]} or {"id": ..., "prompt": "..."}, optionally "system", "tools"
(OpenAI function definitions) and any sampling field ("max_tokens", "temperature", "top_p", "top_k", "seed",
"min_p", "repetition_penalty", "presence_penalty", "stop"), which override the command line's. A line without
"id" is known by its line number. One JSON line out per request, in input order: {"id", "text", "tool_calls",
"finish_reason", "usage"}, or {"id", "line", "error"} for a line that cannot be answered (the others go on).
With -o, a rerun skips the ids the file already answers (resume after Ctrl-C) and retries its error lines.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

import typer

from mistral_chat.cli import options as opt
from mistral_chat.engine.options import SamplingParams
from mistral_chat.errors import MistralChatError

REQUEST_KEYS = frozenset({"id", "messages", "prompt", "system", "tools"})
SAMPLING_KEYS = frozenset(SamplingParams.__dataclass_fields__)


class BatchFileError(MistralChatError):
    """An input or output file that cannot be read or written."""


@dataclass(frozen=True)
class BatchLine:
    """One input line: its number, its id, and the request it makes (or why it makes none)."""

    number: int
    id: Any
    request: Any = None  # an api.ChatRequest
    error: str = ""


def id_key(value: Any) -> str:
    """Ids compare as their JSON text (1 and "1" are different ids)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def parse_line(number: int, text: str, defaults: SamplingParams, system: str | None, tools: list[Any] | None
               ) -> BatchLine:
    """A request from one JSON line, with the command line's sampling, system prompt and tools as defaults."""
    from mistral_chat.api import ChatRequest, sampling_params, to_chat_messages, to_tools

    try:
        data = json.loads(text)
    except ValueError as exc:
        return BatchLine(number, None, error=f"line {number} is not valid JSON: {exc}")
    except RecursionError:
        return BatchLine(number, None, error=f"line {number} nests too deeply")
    if not isinstance(data, dict):
        return BatchLine(number, None, error=f"line {number} must be a JSON object with \"messages\" or \"prompt\"")
    line_id = data.get("id", number)
    if isinstance(line_id, (dict, list)):
        return BatchLine(number, None, error=f"line {number}: \"id\" must be a string or a number")
    try:
        unknown = sorted(set(data) - REQUEST_KEYS - SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} (known: messages, prompt, system, tools, "
                             f"{', '.join(sorted(SAMPLING_KEYS))})")
        if ("messages" in data) == ("prompt" in data):
            raise ValueError("give either \"messages\" (a list) or \"prompt\" (a string)")
        if "prompt" in data:
            if not isinstance(data["prompt"], str):
                raise ValueError("\"prompt\" must be a string")
            messages: list[Any] = [{"role": "user", "content": data["prompt"]}]
        else:
            if not isinstance(data["messages"], list):
                raise ValueError("\"messages\" must be a list of {\"role\", \"content\"} objects")
            messages = data["messages"]
        line_system = data.get("system", system)
        if line_system is not None:
            if not isinstance(line_system, str):
                raise ValueError("\"system\" must be a string")
            messages = [{"role": "system", "content": line_system}, *messages]
        line_tools = data.get("tools", tools)
        if line_tools is not None and not isinstance(line_tools, list):
            raise ValueError("\"tools\" must be a list of function definitions")
        sampling = {k: v for k, v in data.items() if k in SAMPLING_KEYS}
        params = sampling_params(defaults, **sampling)
        request = ChatRequest(to_chat_messages(messages), to_tools(line_tools), params)
    except (ValueError, TypeError, MistralChatError) as exc:
        return BatchLine(number, line_id, error=f"line {number}: {exc}")
    return BatchLine(number, line_id, request)


def read_lines(source: IO[str], defaults: SamplingParams, system: str | None, tools: list[Any] | None
               ) -> list[BatchLine]:
    lines = []
    seen: set[str] = set()
    for number, text in enumerate(source, start=1):
        if not text.strip():
            continue
        line = parse_line(number, text, defaults, system, tools)
        if line.id is not None:
            key = id_key(line.id)
            if key in seen:
                line = BatchLine(number, line.id, error=f"line {number}: id {key} comes twice: ids must be unique")
            seen.add(key)
        lines.append(line)
    return lines


def answered_ids(output: Path) -> set[str]:
    """The ids `output` already answers; its error lines (and a torn last line) are dropped from it, so that a
    rerun retries them."""
    try:
        text = output.read_text(encoding="utf-8")
    except FileNotFoundError:
        return set()
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchFileError(f"cannot read {output} to resume it ({exc}): pick another -o file") from exc
    kept, done = [], set()
    for raw in text.splitlines():
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict) and "id" in data and "error" not in data:
            kept.append(raw)
            done.add(id_key(data["id"]))
    if len(kept) != len(text.splitlines()) or (text and not text.endswith("\n")):
        temp = output.with_name(output.name + ".tmp")
        temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(temp, output)
    return done


def _read_tools(path: Path | None) -> list[Any] | None:
    if path is None:
        return None
    from mistral_chat.chat.tools import load_tools

    return [tool.to_json() for tool in load_tools(path)]


def _open_input(path: Path | None) -> IO[str]:
    if path is None or str(path) == "-":
        return sys.stdin
    try:
        return path.open(encoding="utf-8")
    except OSError as exc:
        raise BatchFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def batch_command(
    input: Optional[Path] = typer.Argument(None, help="JSONL file of requests (omitted or -: stdin).",
                                           show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="JSONL answers (default: stdout); a rerun resumes it."),
    model: Optional[str] = opt.MODEL,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1,
                                             help="Sequences generated together (default: what memory allows, "
                                                  "at most 64)."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt for lines without one."),
    tools: Optional[Path] = typer.Option(None, "--tools", help="JSON file of functions for lines without tools."),
    max_tokens: int = opt.MAX_TOKENS,
    temperature: float = opt.TEMPERATURE,
    top_p: float = opt.TOP_P,
    top_k: int = opt.TOP_K,
    seed: Optional[int] = opt.SEED,
    min_p: float = opt.MIN_P,
    repetition_penalty: float = opt.REPETITION_PENALTY,
    presence_penalty: float = opt.PRESENCE_PENALTY,
    stop: Optional[list[str]] = opt.STOP,
    device: str = opt.DEVICE,
    dtype: str = opt.DTYPE,
    context: Optional[int] = opt.CONTEXT,
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel processes, one per GPU."),
    quantize: Optional[str] = opt.QUANTIZE,
    lora: Optional[Path] = opt.LORA,
    lora_scale: float = opt.LORA_SCALE,
) -> None:
    """Answer a JSONL file of requests, many at a time; one JSON line out per request, in input order."""
    defaults = opt.sampling_params(temperature, top_p, top_k, max_tokens, seed, min_p, repetition_penalty,
                                   presence_penalty, stop)
    source = _open_input(input)
    try:
        lines = read_lines(source, defaults, system, _read_tools(tools))
    finally:
        if source is not sys.stdin:
            source.close()
    done = answered_ids(output) if output is not None else set()
    todo = [line for line in lines if line.id is None or id_key(line.id) not in done]
    skipped = len(lines) - len(todo)
    if skipped:
        _say(f"{skipped} request(s) already answered in {output}: skipped")
    if not todo:
        return
    out = _open_output(output)
    try:
        run_batch(todo, out, model, batch_size,
                  dict(device=device, dtype=dtype, quantize=quantize, context=context, tp=tp, lora=lora,
                       lora_scale=lora_scale, compile=tp > 1))
    finally:
        if out is not sys.stdout:
            out.close()


def _say(text: str) -> None:
    print(f"mistral-chat: {text}", file=sys.stderr, flush=True)


def _open_output(output: Path | None) -> IO[str]:
    if output is None:
        return sys.stdout
    try:
        return output.open("a", encoding="utf-8")
    except OSError as exc:
        raise BatchFileError(f"cannot write {output}: {exc.strerror or exc}") from exc


def run_batch(lines: list[BatchLine], out: IO[str], model_name: str | None, batch_size: int | None,
              load: dict[str, Any]) -> None:
    """Load the model, answer `lines` and write one JSON line each to `out`, in their order, as soon as every
    line before it is written."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mistral_chat.api import Model

    results: dict[int, dict[str, Any]] = {}
    next_out = 0

    def flush() -> None:
        nonlocal next_out
        while next_out in results:
            out.write(json.dumps(results.pop(next_out), ensure_ascii=False) + "\n")
            next_out += 1
        out.flush()

    requests, where = [], []
    for i, line in enumerate(lines):
        if line.request is None:
            results[i] = {"id": line.id, "line": line.number, "error": line.error}
        else:
            requests.append(line.request)
            where.append(i)
    flush()
    if not requests:
        return
    console = Console(stderr=True)
    with Model.load(model_name, **load) as model:
        started = time.perf_counter()
        tokens = errors = 0
        columns = (TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
            task = progress.add_task("batch", total=len(requests), rate="")
            for index, outcome in model.chat_requests(requests, batch_size=batch_size):
                line = lines[where[index]]
                if isinstance(outcome, MistralChatError):
                    errors += 1
                    results[where[index]] = {"id": line.id, "line": line.number, "error": str(outcome)}
                else:
                    tokens += outcome.usage.generated_tokens
                    results[where[index]] = {"id": line.id, **outcome.to_json()}
                flush()
                rate = tokens / max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=1, rate=f"{rate:.1f} tok/s")
        seconds = time.perf_counter() - started
        _say(f"answered {len(requests) - errors} of {len(requests)} request(s) in {seconds:.1f} s "
             f"({tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tok/s)"
             + (f", {errors} error(s)" if errors else ""))


def register(app: typer.Typer) -> None:
    app.command("batch")(batch_command)

