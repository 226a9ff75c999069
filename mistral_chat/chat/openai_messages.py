"""OpenAI-style chat messages and function definitions as the chat layer's `ChatMessage`s and `Tool`s (the Python
API's and `mistral-chat batch`'s input)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Union

from mistral_chat.chat.templates import ROLES, ChatMessage
from mistral_chat.chat.tools import Tool, ToolCall, new_tool_call_id, tool_from_json
from mistral_chat.errors import MistralChatError

Message = Union[Mapping[str, Any], ChatMessage]
ToolSpec = Union[Mapping[str, Any], Tool]


class MessageError(MistralChatError, ValueError):
    """A message that is not an OpenAI-style chat message."""


def _content(value: Any, where: str) -> str:
    """A message's content: a string, None, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise MessageError(f"{where}: only text content parts are supported")
        return "".join(texts)
    raise MessageError(f"{where}: \"content\" must be a string, got {type(value).__name__}")


def _tool_call(value: Any, where: str) -> ToolCall:
    """An assistant's call in OpenAI's form {"id", "type": "function", "function": {"name", "arguments"}}."""
    if isinstance(value, ToolCall):
        return value
    if not isinstance(value, Mapping):
        raise MessageError(f"{where}: a tool call must be an object")
    function = value.get("function", value)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise MessageError(f"{where}: a tool call needs \"function\": {{\"name\", \"arguments\"}}")
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):  # some clients send the object itself
        arguments = json.dumps(arguments, ensure_ascii=False)
    call_id = value.get("id") or new_tool_call_id()
    if not isinstance(call_id, str):
        raise MessageError(f"{where}: a tool call's \"id\" must be a string")
    return ToolCall(id=call_id, name=function["name"], arguments=arguments)


def to_chat_messages(messages: Iterable[Message]) -> list[ChatMessage]:
    """OpenAI-style message dicts (or ChatMessages, kept as they are) as the chat layer's ChatMessages;
    MessageError names the message and field that is wrong."""
    out: list[ChatMessage] = []
    for i, message in enumerate(messages):
        if isinstance(message, ChatMessage):
            out.append(message)
            continue
        where = f"message {i}"
        if not isinstance(message, Mapping):
            raise MessageError(f"{where}: expected an object with \"role\" and \"content\", "
                               f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise MessageError(f"{where}: \"role\" must be one of {', '.join(ROLES)}, got {role!r}")
        content = _content(message.get("content"), where)
        calls = message.get("tool_calls") or ()
        if calls and role != "assistant":
            raise MessageError(f"{where}: only assistant messages carry \"tool_calls\"")
        if not isinstance(calls, (list, tuple)):
            raise MessageError(f"{where}: \"tool_calls\" must be a list")
        tool_call_id = message.get("tool_call_id")
        name = message.get("name")
        if tool_call_id is not None and not isinstance(tool_call_id, str):
            raise MessageError(f"{where}: \"tool_call_id\" must be a string")
        if name is not None and not isinstance(name, str):
            raise MessageError(f"{where}: \"name\" must be a string")
        out.append(ChatMessage(role, content, tool_calls=tuple(_tool_call(c, where) for c in calls),
                               tool_call_id=tool_call_id if role == "tool" else None,
                               name=name if role == "tool" else None))
    if not out:
        raise MessageError("no messages: give at least one user message")
    return out


def to_tools(tools: Iterable[ToolSpec] | None) -> tuple[Tool, ...]:
    """Functions the model may call, as `--tools` takes them: OpenAI tools ({"type": "function", "function":
    {...}}), bare function objects, or Tools."""
    if tools is None:
        return ()
    return tuple(t if isinstance(t, Tool) else tool_from_json(t, f"tool {i}") for i, t in enumerate(tools))
