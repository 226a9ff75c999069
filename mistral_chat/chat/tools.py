"""Function calling: tool definitions, tool calls and results in a conversation, tool calls in a model's output.

The token layout is mistral-common's (`encode_chat_completion` with `tools=`), tested against it for every
tokenizer version that has tool tokens. By version (`ToolFormat`):

- v1: no tool tokens; tools are refused (TokenizerError).
- v2: [AVAILABLE_TOOLS] json [/AVAILABLE_TOOLS] right before the LAST user turn's [INST]; an assistant turn with
  calls is [TOOL_CALLS] [{"name", "arguments"}, ...] </s>; a tool result is
  [TOOL_RESULTS] [{"name", "content"}] [/TOOL_RESULTS]. Calls and results before the last user message are left
  out, and one call turn may have only one result after it. Call ids are not used.
- v3: as v2, but calls carry their "id" ([{"name", "arguments", "id"}]), results are
  [TOOL_RESULTS] {"content", "call_id"} [/TOOL_RESULTS], and the whole history is kept. Ids: 9 letters/digits.
- v7: as v3, but an assistant turn may have text before its calls, and a result is
  [TOOL_RESULTS] id [TOOL_CONTENT] content [/TOOL_RESULTS] (content as given, not re-dumped as JSON).
- v11: each call is [TOOL_CALLS] name [CALL_ID] id [ARGS] arguments-json; results are put in the order of the
  calls they answer.
- v13 and later: each call is [TOOL_CALLS] name [ARGS] arguments-json, a result [TOOL_RESULTS] content
  [/TOOL_RESULTS]; [AVAILABLE_TOOLS] goes before the FIRST user turn. Ids are needed but not encoded.

Up to v3 (v1-v3 normalization), arguments and tool results that are JSON are re-dumped compactly as JSON and an
empty result becomes {}; text that is not JSON is kept as a JSON string. Arguments are always re-dumped.

Parsing a model's output (`parse_tool_calls`) looks for the [TOOL_CALLS] token id, never for text. What follows
is either a JSON list of {"name", "arguments"[, "id"]} (v2-v7) or name[CALL_ID]id[ARGS]{json} / name[ARGS]{json}
(v11+), one block per [TOOL_CALLS]. Output that cannot be read raises `ToolCallParseError`, which carries the
decoded text so a caller can show it as a plain answer instead.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistral_chat.errors import MistralChatError, TokenizerError
from mistral_chat.text.base import Tokenizer

log = logging.getLogger(__name__)

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
CALL_ID_ALPHABET = string.ascii_letters + string.digits


class ToolsFileError(MistralChatError):
    """A --tools file that cannot be read or is not a list of function definitions."""


class ToolCallParseError(MistralChatError):
    """A model output that starts tool calls but cannot be read as such; `text` is the output as plain text."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The OpenAI / mistral-common form, as the model sees it in [AVAILABLE_TOOLS]."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """One call the assistant made: an id (9 letters/digits), the function name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def to_json(self) -> dict[str, Any]:
        """OpenAI's form: {"id", "type": "function", "function": {"name", "arguments": json-text}}."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_tool_call_id() -> str:
    """A fresh call id of the form every version accepts: 9 random letters and digits."""
    return "".join(secrets.choice(CALL_ID_ALPHABET) for _ in range(9))


# ---------------------------------------------------------------------------------------------- tools files


def tool_from_json(entry: Any, where: str) -> Tool:
    """A Tool from {"type": "function", "function": {...}} or a bare {"name", "description", "parameters"}."""
    if isinstance(entry, dict) and "function" in entry:
        if entry.get("type", "function") != "function":
            raise ToolsFileError(f"{where}: tool type {entry.get('type')!r} is not supported, only \"function\"")
        entry = entry["function"]
    if not isinstance(entry, dict):
        raise ToolsFileError(f"{where}: expected a function object with a \"name\", got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise ToolsFileError(
            f"{where}: function name {name!r} must be 1-64 letters, digits, underscores or dashes"
        )
    description = entry.get("description") or ""
    parameters = entry.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(description, str):
        raise ToolsFileError(f"{where}: the \"description\" of {name} must be a string")
    if not isinstance(parameters, dict):
        raise ToolsFileError(f"{where}: the \"parameters\" of {name} must be a JSON schema object")
    return Tool(name=name, description=description, parameters=parameters)


MAX_TOOLS_BYTES = 4 << 20  # a tools file is a few KB; more is a mistake (`--tools /dev/zero`)


def load_tools(path: str | Path) -> list[Tool]:
    """The tools of a JSON file: a list of OpenAI-style tools or bare function objects (one object also works).
    At most MAX_TOOLS_BYTES are read."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOOLS_BYTES + 1)
    except OSError as exc:
        raise ToolsFileError(f"cannot read tools file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_TOOLS_BYTES:
        raise ToolsFileError(f"tools file {path} is larger than {MAX_TOOLS_BYTES >> 20} MB: "
                             "pass a JSON file of tool definitions")
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and bad UTF-8
        raise ToolsFileError(f"tools file {path} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ToolsFileError(f"tools file {path} nests too deeply to be tool definitions") from None
    if isinstance(data, dict) and isinstance(data.get("tools"), list):
        data = data["tools"]  # a request body {"tools": [...]} works too
    entries = data if isinstance(data, list) else [data]
    tools = [tool_from_json(entry, f"tools file {path}, entry {i}") for i, entry in enumerate(entries)]
    names = [tool.name for tool in tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ToolsFileError(f"tools file {path} defines {', '.join(duplicates)} more than once")
    log.debug("loaded %d tools from %s", len(tools), path)
    return tools


# ---------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class ToolFormat:
    """How one family of tokenizer versions writes tools, calls and results (see the module docstring)."""

    version: int
    call_ids: str  # "none" (v2) | "short" (9 letters/digits, v3-v11) | "any" (non-empty, v13+)
    calls_with_args_token: bool  # v11+: [TOOL_CALLS] name [ARGS] json, else a JSON list
    call_id_token: bool  # v11: [CALL_ID] id between name and [ARGS]
    result_layout: str  # "name-list" (v2) | "call-id-json" (v3) | "tool-content" (v7, v11) | "plain" (v13+)
    tools_before_first_user: bool  # v13+ (else before the last user turn)
    drops_old_turns: bool  # v2: calls and results before the last user message are left out
    text_with_calls: bool  # v7+: an assistant message may hold text and calls
    json_normalized: bool  # v2, v3: tool results that are JSON are re-dumped; "" becomes {}
    results_in_call_order: bool  # v11+


def tool_format(tokenizer: Tokenizer) -> ToolFormat:
    """The tool layout of a tokenizer; TokenizerError for one without tool tokens (v1)."""
    number = tokenizer.version_number
    if number < 2:
        raise TokenizerError(
            f"the model's tokenizer ({tokenizer.version}, {tokenizer.path}) has no function calling; "
            "use a model made for tools (e.g. Mistral-7B-Instruct-v0.3 or later) or drop --tools"
        )
    if number == 2:
        result_layout = "name-list"
    elif number < 7:
        result_layout = "call-id-json"
    else:
        result_layout = "tool-content" if number < 13 else "plain"
    return ToolFormat(
        version=number,
        call_ids="none" if number == 2 else ("short" if number < 13 else "any"),
        calls_with_args_token=number >= 11,
        call_id_token=11 <= number < 13,
        result_layout=result_layout,
        tools_before_first_user=number >= 13,
        drops_old_turns=number == 2,
        text_with_calls=number >= 7,
        json_normalized=number < 7,
        results_in_call_order=number >= 11,
    )


def supports_tools(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer has function calling (v2 and later)."""
    return tokenizer.version_number >= 2


def check_call_id(call_id: str | None, fmt: ToolFormat, what: str) -> None:
    """ValueError for a call id this format cannot take (v3-v11: 9 letters/digits; v13+: non-empty)."""
    if fmt.call_ids == "short" and (call_id is None or not CALL_ID.fullmatch(call_id)):
        raise ValueError(f"{what} id {call_id!r} must be 9 letters or digits for tokenizer v{fmt.version}")
    if fmt.call_ids == "any" and (not call_id or call_id == "null"):
        raise ValueError(f"{what} needs an id for tokenizer v{fmt.version}")


def check_tool_name(name: str | None, what: str) -> None:
    if name is None or not TOOL_NAME.fullmatch(name):
        raise ValueError(f"{what} name {name!r} must be 1-64 letters, digits, underscores or dashes")


def _json_or_text(text: str | None, empty: Any) -> Any:
    """JSON text as its value; `empty` for ""; other text as itself (mistral-common's normalization)."""
    if not text:
        return empty
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def encode_available_tools(tokenizer: Tokenizer, tools: Sequence[Tool]) -> list[int]:
    """[AVAILABLE_TOOLS] json-list [/AVAILABLE_TOOLS] (nothing for no tools)."""
    if not tools:
        return []
    return [
        tokenizer.special_id("[AVAILABLE_TOOLS]"),
        *tokenizer.encode(_dumps([tool.to_json() for tool in tools])),
        tokenizer.special_id("[/AVAILABLE_TOOLS]"),
    ]


def encode_tool_calls(tokenizer: Tokenizer, fmt: ToolFormat, calls: Sequence[ToolCall]) -> list[int]:
    """An assistant turn's calls (without the </s> that ends the turn)."""
    tool_calls = tokenizer.special_id("[TOOL_CALLS]")
    if not fmt.calls_with_args_token:
        listed = []
        for call in calls:
            entry: dict[str, Any] = {"name": call.name, "arguments": _json_or_text(call.arguments, {})}
            if fmt.call_ids != "none" and call.id and call.id != "null":
                entry["id"] = call.id
            listed.append(entry)
        return [tool_calls, *tokenizer.encode(_dumps(listed))]
    ids: list[int] = []
    for call in calls:
        ids.append(tool_calls)
        ids.extend(tokenizer.encode(call.name))
        if fmt.call_id_token and call.id and call.id != "null":
            ids.append(tokenizer.special_id("[CALL_ID]"))
            ids.extend(tokenizer.encode(call.id))
        ids.append(tokenizer.special_id("[ARGS]"))
        ids.extend(tokenizer.encode(_dumps(_json_or_text(call.arguments, {}))))
    return ids


def encode_tool_result(tokenizer: Tokenizer, fmt: ToolFormat, content: str, call_id: str | None,
                       name: str | None) -> list[int]:
    """[TOOL_RESULTS] ... [/TOOL_RESULTS] for one tool message."""
    begin, end = tokenizer.special_id("[TOOL_RESULTS]"), tokenizer.special_id("[/TOOL_RESULTS]")
    if fmt.result_layout == "name-list":
        body = tokenizer.encode(_dumps([{"name": name, "content": _json_or_text(content, {})}]))
    elif fmt.result_layout == "call-id-json":
        body = tokenizer.encode(_dumps({"content": _json_or_text(content, {}), "call_id": call_id}))
    elif fmt.result_layout == "tool-content":
        body = [*tokenizer.encode(call_id or ""), tokenizer.special_id("[TOOL_CONTENT]"), *tokenizer.encode(content)]
    else:
        body = tokenizer.encode(content)
    return [begin, *body, end]


# ---------------------------------------------------------------------------------------------- parsing


def _optional_special(tokenizer: Tokenizer, name: str) -> int | None:
    try:
        return tokenizer.special_id(name)
    except TokenizerError:
        return None


def find_tool_calls(tokenizer: Tokenizer, ids: Sequence[int]) -> int | None:
    """Index of the first [TOOL_CALLS] token in `ids`, None if there is none (or the tokenizer has no such token)."""
    marker = _optional_special(tokenizer, "[TOOL_CALLS]")
    if marker is None:
        return None
    for index, token_id in enumerate(ids):
        if token_id == marker:
            return index
    return None


def _arguments_text(value: Any) -> str:
    """Arguments as JSON text: a JSON string that itself holds JSON is unwrapped, other values are dumped."""
    if isinstance(value, str):
        parsed = _json_or_text(value, {})
        return _dumps(parsed) if not isinstance(parsed, str) else _dumps(value)
    return _dumps({} if value is None else value)


def _calls_from_json_list(text: str, raw: str) -> list[ToolCall]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolCallParseError(f"the model's tool calls are not valid JSON ({exc}): {text!r}", raw) from exc
    entries = value if isinstance(value, list) else [value]
    calls = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ToolCallParseError(f"the model's tool call has no function name: {_dumps(entry)}", raw)
        call_id = entry.get("id")
        call_id = call_id if isinstance(call_id, str) and call_id and call_id != "null" else new_tool_call_id()
        calls.append(ToolCall(call_id, entry["name"], _arguments_text(entry.get("arguments"))))
    return calls


def _call_from_args_block(tokenizer: Tokenizer, block: list[int], args: int, call_id_token: int | None,
                          raw: str) -> ToolCall:
    at_args = block.index(args)
    head, tail = block[:at_args], block[at_args + 1:]
    call_id = ""
    if call_id_token is not None and call_id_token in head:
        at_id = head.index(call_id_token)
        call_id = tokenizer.decode(head[at_id + 1:]).strip()
        head = head[:at_id]
    name = tokenizer.decode(head).strip()
    arguments = tokenizer.decode(tail).strip()
    if not name:
        raise ToolCallParseError("the model's tool call has no function name", raw)
    try:
        value = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError as exc:
        raise ToolCallParseError(
            f"the model's arguments for {name} are not valid JSON ({exc}): {arguments!r}", raw
        ) from exc
    return ToolCall(call_id or new_tool_call_id(), name, _dumps(value))


def parse_tool_calls(tokenizer: Tokenizer, ids: Sequence[int]) -> list[ToolCall] | None:
    """The tool calls in a model's generated ids; None when it made none (no [TOOL_CALLS] token).

    `ids` are the generated tokens (a trailing </s> and anything after it are ignored). Text before the first
    [TOOL_CALLS] (v7+ models may write some) is not part of the calls: `find_tool_calls` gives where they start.
    Calls without an id get a fresh one. ToolCallParseError if the calls cannot be read (bad JSON, no name).
    """
    start = find_tool_calls(tokenizer, ids)
    if start is None:
        return None
    ids = list(ids)
    if tokenizer.eos_id in ids[start:]:
        ids = ids[: ids.index(tokenizer.eos_id, start)]
    raw = tokenizer.decode(ids)
    marker = tokenizer.special_id("[TOOL_CALLS]")
    args = _optional_special(tokenizer, "[ARGS]")
    call_id_token = _optional_special(tokenizer, "[CALL_ID]")
    blocks: list[list[int]] = []
    for token_id in ids[start:]:
        if token_id == marker:
            blocks.append([])
        else:
            blocks[-1].append(token_id)
    calls: list[ToolCall] = []
    for block in blocks:
        if args is not None and args in block:
            calls.append(_call_from_args_block(tokenizer, block, args, call_id_token, raw))
        else:
            text = tokenizer.decode(block).strip()
            if not text:
                raise ToolCallParseError("the model started a tool call but wrote no call", raw)
            calls.extend(_calls_from_json_list(text, raw))
    return calls


@dataclass(frozen=True)
class ToolCallsRead:
    """What an answer's ids hold: its text (before the calls, or all of it), the calls, or why they are unreadable."""

    text: str
    calls: tuple[ToolCall, ...] = ()
    error: str = ""


def read_tool_calls(tokenizer: Tokenizer, ids: Sequence[int], streamed_text: str) -> ToolCallsRead:
    """The tool calls in an answer's generated ids, found by the [TOOL_CALLS] token id (`parse_tool_calls`).

    No calls: the streamed text as it is. Unreadable calls: the raw text, and the error. Calls: the text the
    model wrote before them (kept only where the format allows text with calls, v7+).
    """
    try:
        calls = parse_tool_calls(tokenizer, ids)
    except ToolCallParseError as exc:
        log.info("unreadable tool calls: %s", exc)
        return ToolCallsRead(exc.text, error=str(exc))
    if not calls:
        return ToolCallsRead(streamed_text)
    start = find_tool_calls(tokenizer, ids) or 0
    before = tokenizer.decode(list(ids[:start])).strip() if tool_format(tokenizer).text_with_calls else ""
    return ToolCallsRead(before, tuple(calls))
