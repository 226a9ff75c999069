"""Instruct formats: a conversation as the token ids a Mistral model expects, ready for the assistant's answer.

The ids are those of mistral-common's `encode_chat_completion` (tested against it for every tokenizer file it
ships). The rules, by tokenizer version (v2/v3 and v7/v11/v13 differ only in tool calls, which we don't use):

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
- Everything starts with <s>. Texts are encoded one piece at a time (sentencepiece adds its dummy prefix
  space to each piece).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Literal

from mistral_chat.text.base import Tokenizer

log = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")
KNOWN_VERSIONS = (1, 2, 3, 7, 11, 13, 15)
JOIN = "\n\n"


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


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
    if not messages or messages[-1].role != "user":
        raise ValueError("a conversation to answer must end with a user message")


def _joined(messages: Sequence[ChatMessage]) -> str:
    return JOIN.join(m.content for m in messages if m.content)


def normalize(messages: Sequence[ChatMessage], layout: InstructLayout) -> tuple[list[ChatMessage], str | None]:
    """Merged messages in the layout's order, and the system prompt of layouts that move it into a user turn."""
    merged: list[ChatMessage] = []
    system_prompt: str | None = None
    if not layout.system_tokens:
        system_prompt = _joined([m for m in messages if m.role == "system"]) or None
    for role, group in groupby(messages, key=lambda m: m.role):
        run = list(group)
        if role != "system":
            merged.append(ChatMessage(role, _joined(run)))
        elif layout.system_tokens:
            merged.extend(run)  # system messages are not merged with each other
    if not layout.system_tokens and merged[0].role != "user":
        merged.insert(0, ChatMessage("user", ""))
    return merged, system_prompt


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    """<s> and every turn, ending with the last user turn's [/INST]: the model's answer comes next.

    The last message must be the user's (ValueError otherwise). An empty assistant message (a model that
    answered with </s> at once) is kept as just </s>.
    """
    _check(messages)
    layout = instruct_layout(tokenizer)
    merged, system_prompt = normalize(messages, layout)
    user_turns = [i for i, m in enumerate(merged) if m.role == "user"]
    prompt_turn = user_turns[0] if layout.system_in_first_user else user_turns[-1]

    ids = [tokenizer.bos_id]
    for index, message in enumerate(merged):
        content = message.content
        if message.role == "system":
            ids.append(tokenizer.special_id("[SYSTEM_PROMPT]"))
            ids.extend(tokenizer.encode(content))
            ids.append(tokenizer.special_id("[/SYSTEM_PROMPT]"))
        elif message.role == "assistant":
            ids.extend(tokenizer.encode(content.rstrip(" ") if layout.rstrip_assistant else content))
            ids.append(tokenizer.eos_id)
        else:
            if system_prompt and index == prompt_turn:
                content = system_prompt + JOIN + content
            if layout.inst_as_text:
                ids.extend(tokenizer.encode(f"[INST] {content} [/INST]"))
            else:
                ids.append(tokenizer.special_id("[INST]"))
                ids.extend(tokenizer.encode(content))
                ids.append(tokenizer.special_id("[/INST]"))
    return ids
