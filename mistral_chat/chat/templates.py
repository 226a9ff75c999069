"""Instruct formats: a conversation as the token ids a Mistral model expects, ready for the assistant's answer.

The ids are those of mistral-common's `encode_chat_completion` (tested against it for every tokenizer file it
ships). The rules, by tokenizer version (v2/v3 and v7/v11/v13 differ only in tool calls: see `chat/tools.py` for
where tools, calls and results go):

- Messages are first normalized: consecutive messages of one role become one, their non-empty contents joined
  by a blank line.
- v1, v2, v3 (sentencepiece or tekken): system messages are taken out of the conversation and joined by a blank
  line into one system prompt, which goes in front of the FIRST user message for v1 and of the LAST one for
  v2/v3 ("system\\n\\nuser"). A conversation that does not then start with a user message gets an empty one.
- v1: a user turn is the text "[INST] {content} [/INST]" (no control tokens in that vocabulary); an assistant
  turn is its content followed by </s>.
- v2, v3: a user turn is [INST] content [/INST] (control tokens); an assistant turn is its content with
  trailing spaces removed, then </s>.
- v7 and later: as v3, but each system message stays where it is, as [SYSTEM_PROMPT] content [/SYSTEM_PROMPT].
- Tool messages (results) are never merged; consecutive assistant messages merge their calls too.
- Everything starts with <s>. Texts are encoded one piece at a time (sentencepiece adds its dummy prefix
  space to each piece).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Literal

from mistral_chat.chat.tools import (
    Tool,
    ToolCall,
    ToolFormat,
    check_call_id,
    check_tool_name,
    encode_available_tools,
    encode_tool_calls,
    encode_tool_result,
    tool_format,
)
from mistral_chat.text.base import Tokenizer

log = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")
KNOWN_VERSIONS = (1, 2, 3, 7, 11, 13, 15)
JOIN = "\n\n"


@dataclass(frozen=True)
class ChatMessage:
    """One message. An assistant message may carry tool calls (content "" or, v7+, text before them); a "tool"
    message is the result of the call `tool_call_id` to the function `name`."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = field(default=(), kw_only=True)
    tool_call_id: str | None = field(default=None, kw_only=True)
    name: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.tool_calls, tuple):  # accept a list, keep the message hashable
            object.__setattr__(self, "tool_calls", tuple(self.tool_calls))


@dataclass(frozen=True)
class InstructLayout:
    """How one family of versions lays out a conversation."""

    inst_as_text: bool  # v1: "[INST] ... [/INST]" is text, not control tokens
    system_in_first_user: bool  # v1: the system prompt joins the first user message (v2/v3: the last)
    system_tokens: bool  # v7+: [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT] blocks in place
    rstrip_assistant: bool  # v2+: trailing spaces of assistant messages are dropped


V1_LAYOUT = InstructLayout(inst_as_text=True, system_in_first_user=True, system_tokens=False, rstrip_assistant=False)
V2_LAYOUT = InstructLayout(inst_as_text=False, system_in_first_user=False, system_tokens=False, rstrip_assistant=True)
V7_LAYOUT = InstructLayout(inst_as_text=False, system_in_first_user=False, system_tokens=True, rstrip_assistant=True)


def instruct_layout(tokenizer: Tokenizer) -> InstructLayout:
    number = tokenizer.version_number
    if number not in KNOWN_VERSIONS:
        log.warning("unknown tokenizer version %s; using the format of the version before it", tokenizer.version)
    if number <= 1:
        return V1_LAYOUT
    return V2_LAYOUT if number < 7 else V7_LAYOUT


def instruct_format(tokenizer: Tokenizer) -> str:
    """Name of the tokenizer's instruct format: "v1", "v2", "v3", "v7", ..., "tekken-v3", "tekken-v7", ..."""
    return f"tekken-{tokenizer.version}" if tokenizer.is_tekken else tokenizer.version


def _check(messages: Sequence[ChatMessage]) -> None:
    for message in messages:
        if message.role not in ROLES:
            raise ValueError(f"unknown message role {message.role!r}; expected one of {', '.join(ROLES)}")
        if message.tool_calls and message.role != "assistant":
            raise ValueError(f"a message of role {message.role!r} cannot hold tool calls, only the assistant's")
    if not messages or messages[-1].role not in ("user", "tool"):
        raise ValueError("a conversation to answer must end with a user message (or with tool results)")


def _uses_tools(messages: Sequence[ChatMessage]) -> bool:
    return any(m.role == "tool" or m.tool_calls for m in messages)


def _check_tool_turns(messages: Sequence[ChatMessage], fmt: ToolFormat) -> None:
    """Each tool result follows the call it answers; ids and names fit the format (mistral-common's validation)."""
    calls: list[ToolCall] = []  # calls of the last assistant turn that made some
    answered: list[str] = []
    previous: ChatMessage | None = None
    for message in messages:
        if message.role == "tool":
            if previous is None or not (previous.role == "tool" or previous.tool_calls):
                raise ValueError("a message of role 'tool' must follow an assistant message with tool calls")
            check_call_id(message.tool_call_id, fmt, "tool result's call")
            if message.name is not None:
                check_tool_name(message.name, "tool result's function")
            if fmt.results_in_call_order and message.tool_call_id not in [c.id for c in calls]:
                raise ValueError(f"tool result for unknown call id {message.tool_call_id!r}")
            if message.tool_call_id in answered and fmt.results_in_call_order:
                raise ValueError(f"two tool results for call id {message.tool_call_id!r}")
            answered.append(message.tool_call_id or "")
            if len(answered) > len(calls):
                raise ValueError("more tool results than tool calls")
        elif message.role == "assistant":
            if len(answered) != len(calls):
                raise ValueError(f"{len(calls)} tool calls but {len(answered)} tool results before the next answer")
            calls, answered = list(message.tool_calls), []
            for call in calls:
                check_call_id(call.id, fmt, f"tool call to {call.name}:")
                check_tool_name(call.name, "tool call's function")
            if len({c.id for c in calls}) != len(calls) and fmt.results_in_call_order:
                raise ValueError("two tool calls with one id")
        previous = message


def _joined(messages: Sequence[ChatMessage]) -> str:
    return JOIN.join(m.content for m in messages if m.content)


def _in_call_order(results: list[ChatMessage], call_ids: list[str]) -> list[ChatMessage]:
    """Tool results sorted by the position of their call (v11+); results for unknown ids go last, in order."""
    position = {call_id: i for i, call_id in enumerate(call_ids)}
    return sorted(results, key=lambda m: position.get(m.tool_call_id or "", len(call_ids)))


def normalize(messages: Sequence[ChatMessage], layout: InstructLayout,
              results_in_call_order: bool = False) -> tuple[list[ChatMessage], str | None]:
    """Merged messages in the layout's order, and the system prompt of layouts that move it into a user turn."""
    merged: list[ChatMessage] = []
    system_prompt: str | None = None
    if not layout.system_tokens:
        system_prompt = _joined([m for m in messages if m.role == "system"]) or None
    call_ids: list[str] = []  # calls since the last tool results, whose order results follow (v11+)
    for role, group in groupby(messages, key=lambda m: m.role):
        run = list(group)
        if role == "tool":
            merged.extend(_in_call_order(run, call_ids) if results_in_call_order else run)
            call_ids = []
        elif role == "assistant":
            calls = tuple(call for m in run for call in m.tool_calls)
            merged.append(ChatMessage(role, _joined(run), tool_calls=calls))
            call_ids.extend(call.id for call in calls)
        elif role != "system":
            merged.append(ChatMessage(role, _joined(run)))
        elif layout.system_tokens:
            merged.extend(run)  # system messages are not merged with each other
    if not merged or (not layout.system_tokens and merged[0].role != "user"):
        merged.insert(0, ChatMessage("user", ""))
    return merged, system_prompt


def _check_v2_results(merged: Sequence[ChatMessage], last_user: int) -> None:
    """v2 writes one result per call turn after the last user message (mistral-common refuses more)."""
    results = 0
    for message in merged[last_user + 1:]:
        if message.role == "tool":
            results += 1
            if results > 1:
                raise ValueError("tokenizer v2 takes only one tool result per assistant turn; use a v3+ model")
        else:
            results = 0


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[ChatMessage],
                        tools: Sequence[Tool] | None = None) -> list[int]:
    """<s> and every turn, ready for the assistant's answer after the last user turn's [/INST] or tool results.

    The last message must be the user's or a tool result (ValueError otherwise). An empty assistant message (a
    model that answered with </s> at once) is kept as just </s>. `tools` are the functions the model may call;
    tools, tool calls or results with a tokenizer that has no function calling (v1) raise TokenizerError.
    """
    _check(messages)
    layout = instruct_layout(tokenizer)
    fmt = tool_format(tokenizer) if tools or _uses_tools(messages) else None
    if fmt is not None:
        _check_tool_turns(messages, fmt)
    merged, system_prompt = normalize(messages, layout, results_in_call_order=bool(fmt and fmt.results_in_call_order))
    user_turns = [i for i, m in enumerate(merged) if m.role == "user"]
    last_user = user_turns[-1] if user_turns else -1
    prompt_turn = (user_turns[0] if layout.system_in_first_user else last_user) if user_turns else -1
    tools_turn = (user_turns[0] if fmt and fmt.tools_before_first_user else last_user) if user_turns else -1
    if fmt is not None and fmt.drops_old_turns:
        _check_v2_results(merged, last_user)

    ids = [tokenizer.bos_id]
    for index, message in enumerate(merged):
        content = message.content
        if message.role == "system":
            ids.append(tokenizer.special_id("[SYSTEM_PROMPT]"))
            ids.extend(tokenizer.encode(content))
            ids.append(tokenizer.special_id("[/SYSTEM_PROMPT]"))
        elif message.role == "assistant" and message.tool_calls:
            assert fmt is not None
            if fmt.drops_old_turns and index < last_user:
                continue  # v2 leaves out calls before the last user message
            if content and not fmt.text_with_calls:
                raise ValueError(f"tokenizer {tokenizer.version} cannot have text and tool calls in one "
                                 "assistant message")
            if content:
                ids.extend(tokenizer.encode(content.rstrip(" ")))
            ids.extend(encode_tool_calls(tokenizer, fmt, message.tool_calls))
            ids.append(tokenizer.eos_id)
        elif message.role == "assistant":
            ids.extend(tokenizer.encode(content.rstrip(" ") if layout.rstrip_assistant else content))
            ids.append(tokenizer.eos_id)
        elif message.role == "tool":
            assert fmt is not None
            if fmt.drops_old_turns and index < last_user:
                continue  # v2 leaves out results before the last user message
            ids.extend(encode_tool_result(tokenizer, fmt, content, message.tool_call_id, message.name))
        else:
            if tools and index == tools_turn:
                ids.extend(encode_available_tools(tokenizer, tools))
            if system_prompt and index == prompt_turn:
                content = system_prompt + JOIN + content
            if layout.inst_as_text:
                ids.extend(tokenizer.encode(f"[INST] {content} [/INST]"))
            else:
                ids.append(tokenizer.special_id("[INST]"))
                ids.extend(tokenizer.encode(content))
                ids.append(tokenizer.special_id("[/INST]"))
    return ids
