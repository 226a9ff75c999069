"""Function calling: conversations with tools give exactly mistral-common's ids; tool calls are read back from ids."""

import json
import pathlib
import sys

import pytest

from mistral_chat.chat.templates import ChatMessage, encode_conversation
from mistral_chat.chat.tools import (
    Tool,
    ToolCall,
    ToolCallParseError,
    ToolsFileError,
    encode_tool_calls,
    find_tool_calls,
    load_tools,
    new_tool_call_id,
    parse_tool_calls,
    tool_format,
)
from mistral_chat.errors import MistralChatError, TokenizerError
from mistral_chat.text.tokenizer import load_tokenizer
from tiny_models import MISTRAL_COMMON_TOKENIZERS, mistral_common_data, write_small_tekken

SHIPPED = {name: file for name, file in MISTRAL_COMMON_TOKENIZERS.items() if name != "v1"}  # v1: no tools
SYNTHETIC = ["tekken-v7", "tekken-v11", "tekken-v13"]  # made from tekken_240911.json with a smaller vocabulary
TOOL_TOKENIZERS = list(SHIPPED) + SYNTHETIC
NEW_SPECIALS = ["<unk>", "<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[TOOL_CALLS]",
                "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[IMG]", "<pad>",
                "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[TOOL_CONTENT]", "[ARGS]",
                "[CALL_ID]", "[THINK]", "[/THINK]"]  # fmt: skip

WEATHER = Tool(
    name="get_weather",
    description="Current weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city"]},
)
TIME = Tool(name="get-time", description="Heure locale — 現地時間", parameters={"type": "object", "properties": {}})
NO_ARGS = Tool(name="ping", description="", parameters={})
TOOLS = [WEATHER, TIME, NO_ARGS]

PARIS = ToolCall("abcDEF123", "get_weather", '{"city": "Paris", "unit": "celsius"}')
ZURICH = ToolCall("Zz9Yy8Xx7", "get_weather", '{"city":"Zürich"}')  # compact JSON, re-dumped
CLOCK = ToolCall("T1m3x0000", "get-time", "{}")
PING = ToolCall("p1ngp1ng0", "ping", "")  # no arguments: {}

S, U, A, T = "system", "user", "assistant", "tool"


def call_turn(*calls, content=""):
    return ChatMessage(A, content, tool_calls=list(calls))


def result(call, content):
    return ChatMessage(T, content, tool_call_id=call.id, name=call.name)


CONVERSATIONS = {
    "tools_user": (TOOLS, [ChatMessage(U, "What's the weather in Paris?")]),
    "tools_system": (TOOLS, [ChatMessage(S, "Use tools when useful."), ChatMessage(U, "Weather in Paris?")]),
    "tools_multi_turn": (TOOLS, [ChatMessage(U, "hi"), ChatMessage(A, "Hello!"), ChatMessage(U, "Weather?")]),
    "call_result_follow_up": (TOOLS, [
        ChatMessage(U, "Weather in Paris?"), call_turn(PARIS),
        result(PARIS, '{"temperature": 21, "sky": "clear"}'), ChatMessage(A, "It is 21 °C and clear."),
        ChatMessage(U, "And tomorrow?")]),
    "ends_with_result": (TOOLS, [ChatMessage(U, "Weather in Paris?"), call_turn(PARIS), result(PARIS, "21 C, clear")]),
    "multiple_calls_answered": (TOOLS, [
        ChatMessage(S, "Be brief."), ChatMessage(U, "Weather in Paris and Zürich, and the time?"),
        call_turn(PARIS, ZURICH, CLOCK), result(PARIS, '{"t": 21}'), result(ZURICH, '{"t": 12}'),
        result(CLOCK, "10:42"), ChatMessage(A, "Paris 21, Zürich 12, 10:42."), ChatMessage(U, "Thanks!")]),
    "multiple_calls_pending": (TOOLS, [
        ChatMessage(U, "Weather in Paris and Zürich?"), call_turn(PARIS, ZURICH),
        result(PARIS, '{"t": 21}'), result(ZURICH, '{"t": 12}')]),
    "results_out_of_order": (TOOLS, [
        ChatMessage(U, "Paris and Zürich?"), call_turn(PARIS, ZURICH),
        result(ZURICH, '{"t": 12}'), result(PARIS, '{"t": 21}')]),
    "two_call_turns": (TOOLS, [
        ChatMessage(U, "Paris?"), call_turn(PARIS), result(PARIS, "sunny"), ChatMessage(A, "Sunny."),
        ChatMessage(U, "Time and ping?"), call_turn(CLOCK), result(CLOCK, "noon"), call_turn(PING),
        result(PING, "")]),
    "result_texts": (TOOLS, [
        ChatMessage(U, "ping"), call_turn(PING), result(PING, ""), ChatMessage(A, "ok"), ChatMessage(U, "time"),
        call_turn(CLOCK), result(CLOCK, "  not JSON: 😀 ñ  ")]),
    "result_json_spacing": (TOOLS, [
        ChatMessage(U, "Zürich"), call_turn(ZURICH), result(ZURICH, '{ "temp" :  12 ,"note":"Föhn"}')]),
    "text_and_calls": (TOOLS, [
        ChatMessage(U, "Paris?"), call_turn(PARIS, content="Let me check.  "), result(PARIS, "sunny")]),
    "calls_without_tools_listed": (None, [
        ChatMessage(U, "Paris?"), call_turn(PARIS), result(PARIS, "sunny"), ChatMessage(U, "Thanks")]),
    "no_user_after_system": (TOOLS, [ChatMessage(S, "sys"), ChatMessage(U, "q1"), ChatMessage(U, "q2")]),
}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    files = {name: mistral_common_data() / file for name, file in SHIPPED.items()}
    files["v1"] = mistral_common_data() / "tokenizer.model.v1"
    folder = tmp_path_factory.mktemp("tekken")
    write_small_tekken(folder / "tekken_v7.json", "v7")
    write_small_tekken(folder / "tekken_v11.json", "v11", NEW_SPECIALS)
    write_small_tekken(folder / "tekken_v13.json", "v13", NEW_SPECIALS)
    for version in ("v7", "v11", "v13"):
        files[f"tekken-{version}"] = folder / f"tekken_{version}.json"
    return files


def reference_request(tools, messages):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall
    from mistral_common.protocol.instruct.tool_calls import Tool as ReferenceTool
    from mistral_common.protocol.instruct.tool_calls import ToolCall as ReferenceCall

    def convert(m: ChatMessage):
        if m.role == S:
            return SystemMessage(content=m.content)
        if m.role == U:
            return UserMessage(content=m.content)
        if m.role == T:
            return ToolMessage(content=m.content, tool_call_id=m.tool_call_id, name=m.name)
        calls = [ReferenceCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in m.tool_calls]
        return AssistantMessage(content=m.content or None, tool_calls=calls or None)

    reference_tools = None
    if tools:
        reference_tools = [ReferenceTool(function=Function(name=t.name, description=t.description,
                                                           parameters=t.parameters)) for t in tools]
    return ChatCompletionRequest(messages=[convert(m) for m in messages], tools=reference_tools)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("tokenizer_name", TOOL_TOKENIZERS)
def test_ids_match_mistral_common(tokenizer_pair, tokenizer_name, conversation):
    """Same ids as encode_chat_completion, or, where mistral-common refuses the conversation, an error too."""
    ours, reference = tokenizer_pair(tokenizer_name)
    tools, messages = CONVERSATIONS[conversation]
    try:
        expected = reference.encode_chat_completion(reference_request(tools, messages)).tokens
    except Exception as exc:  # noqa: BLE001 - mistral-common refuses it (v2 multi-results, v3 text+calls)
        with pytest.raises((ValueError, TokenizerError)):
            encode_conversation(ours, messages, tools)
        pytest.skip(f"refused by both: {type(exc).__name__}")
    assert encode_conversation(ours, messages, tools) == expected


EXPECTED_REFUSALS = {  # (tokenizer versions, conversation) that both refuse: keep the skip list honest
    ("v2", "multiple_calls_pending"), ("v2", "results_out_of_order"),
    ("v2", "text_and_calls"), ("v3", "text_and_calls"),
}


@pytest.mark.parametrize("tokenizer_name", TOOL_TOKENIZERS)
def test_refusals_are_the_expected_ones(tokenizer_pair, tokenizer_name):
    ours, reference = tokenizer_pair(tokenizer_name)
    version = ours.version
    for conversation, (tools, messages) in CONVERSATIONS.items():
        refused = (version, conversation) in EXPECTED_REFUSALS
        if refused:
            with pytest.raises(ValueError):
                encode_conversation(ours, messages, tools)
        else:
            encode_conversation(ours, messages, tools)


def test_old_call_still_works(tokenizer_pair):
    ours, _ = tokenizer_pair("v3")
    messages = [ChatMessage(U, "hi")]
    assert encode_conversation(ours, messages) == encode_conversation(ours, messages, None)
    assert encode_conversation(ours, messages) == encode_conversation(ours, messages, [])


@pytest.mark.parametrize("tokenizer_name", ["v3", "tekken-240911", "tekken-v13"])
def test_available_tools_placement(tokenizer_pair, tokenizer_name):
    ours, _ = tokenizer_pair(tokenizer_name)
    messages = [ChatMessage(U, "first"), ChatMessage(A, "ok"), ChatMessage(U, "second")]
    ids = encode_conversation(ours, messages, TOOLS)
    tools_at = ids.index(ours.special_id("[AVAILABLE_TOOLS]"))
    insts = [i for i, t in enumerate(ids) if t == ours.special_id("[INST]")]
    assert tools_at + ids[tools_at:].index(ours.special_id("[/AVAILABLE_TOOLS]")) + 1 == \
        (insts[0] if ours.version == "v13" else insts[-1])


def test_v1_has_no_tools():
    ours = load_tokenizer(mistral_common_data() / "tokenizer.model.v1")
    with pytest.raises(TokenizerError, match="no function calling"):
        encode_conversation(ours, [ChatMessage(U, "hi")], TOOLS)
    with pytest.raises(TokenizerError):
        encode_conversation(ours, [ChatMessage(U, "q"), call_turn(PARIS), result(PARIS, "x")])


@pytest.mark.parametrize("tokenizer_name", ["v3", "tekken-v7", "tekken-v11"])
def test_bad_call_ids_are_refused(tokenizer_pair, tokenizer_name):
    ours, _ = tokenizer_pair(tokenizer_name)
    bad = ToolCall("call_1", "get_weather", "{}")
    with pytest.raises(ValueError, match="9 letters or digits"):
        encode_conversation(ours, [ChatMessage(U, "q"), call_turn(bad), result(bad, "x")])


@pytest.mark.parametrize("tokenizer_name", ["v2", "tekken-v13"])
def test_any_nonempty_id_for_v2_and_v13(tokenizer_pair, tokenizer_name):
    ours, reference = tokenizer_pair(tokenizer_name)
    call = ToolCall("call_1", "get_weather", '{"city": "Oslo"}')
    messages = [ChatMessage(U, "q"), call_turn(call), result(call, "cold")]
    assert encode_conversation(ours, messages) == reference.encode_chat_completion(
        reference_request(None, messages)).tokens


def test_tool_structure_errors(tokenizer_pair):
    ours, _ = tokenizer_pair("v7")
    with pytest.raises(ValueError, match="role 'tool'"):
        encode_conversation(ours, [ChatMessage(U, "q"), result(PARIS, "x")])
    with pytest.raises(ValueError, match="more tool results"):
        encode_conversation(ours, [ChatMessage(U, "q"), call_turn(PARIS), result(PARIS, "x"), result(PARIS, "y")])
    with pytest.raises(ValueError, match="tool results before the next answer"):
        encode_conversation(ours, [ChatMessage(U, "q"), call_turn(PARIS, ZURICH), result(PARIS, "x"),
                                   ChatMessage(A, "hm"), ChatMessage(U, "q")])
    with pytest.raises(ValueError, match="only the assistant"):
        encode_conversation(ours, [ChatMessage(U, "q", tool_calls=[PARIS])])
    with pytest.raises(ValueError, match="end with a user message"):
        encode_conversation(ours, [ChatMessage(U, "q"), call_turn(PARIS)])


def test_message_stays_hashable_with_calls():
    message = ChatMessage(A, "", tool_calls=[PARIS, ZURICH])
    assert message.tool_calls == (PARIS, ZURICH)
    assert hash(message) == hash(ChatMessage(A, "", tool_calls=(PARIS, ZURICH)))


# ---------------------------------------------------------------------------------------------- parsing


def reference_call_ids(reference, calls: list[ToolCall], content: str = "") -> list[int]:
    """What a model trained by mistral-common writes for these calls: its assistant message ids (with </s>).

    Arguments "" become "{}" as mistral-common's request normalizer does before it encodes a conversation.
    """
    from mistral_common.protocol.instruct.messages import AssistantMessage
    from mistral_common.protocol.instruct.tool_calls import FunctionCall
    from mistral_common.protocol.instruct.tool_calls import ToolCall as ReferenceCall

    message = AssistantMessage(
        content=content or None,
        tool_calls=[ReferenceCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments or "{}"))
                    for c in calls])
    return reference.instruct_tokenizer.encode_assistant_message(message, is_before_last_user_message=False)


def same_calls(parsed: list[ToolCall], calls: list[ToolCall], with_ids: bool) -> None:
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == \
        [(c.name, json.loads(c.arguments or "{}")) for c in calls]
    if with_ids:
        assert [c.id for c in parsed] == [c.id for c in calls]
    for call in parsed:
        assert call.id  # a fresh id where the format has none


CALL_SETS = {"one": [PARIS], "three": [PARIS, ZURICH, CLOCK], "no_args": [PING]}


@pytest.mark.parametrize("calls", list(CALL_SETS))
@pytest.mark.parametrize("tokenizer_name", TOOL_TOKENIZERS)
def test_parse_reference_calls(tokenizer_pair, tokenizer_name, calls):
    """Both forms: v2-v7 [TOOL_CALLS][json list], v11 name[CALL_ID]id[ARGS]json, v13 name[ARGS]json."""
    ours, reference = tokenizer_pair(tokenizer_name)
    expected = CALL_SETS[calls]
    ids = reference_call_ids(reference, expected)
    assert ids[-1] == ours.eos_id
    assert encode_tool_calls(ours, tool_format(ours), expected) + [ours.eos_id] == ids
    parsed = parse_tool_calls(ours, ids)
    assert parsed is not None
    same_calls(parsed, expected, with_ids=ours.version in ("v3", "v7", "v11"))
    assert parse_tool_calls(ours, ids[:-1]) == parsed if ours.version in ("v3", "v7", "v11") else True


@pytest.mark.parametrize("tokenizer_name", ["v7", "tekken-v7", "tekken-v11", "tekken-v13"])
def test_parse_after_text(tokenizer_pair, tokenizer_name):
    ours, reference = tokenizer_pair(tokenizer_name)
    ids = reference_call_ids(reference, [PARIS], content="Let me look that up.")
    start = find_tool_calls(ours, ids)
    assert start is not None and ours.decode(ids[:start]) == "Let me look that up."
    same_calls(parse_tool_calls(ours, ids), [PARIS], with_ids=ours.version != "v13")


@pytest.mark.parametrize("tokenizer_name", TOOL_TOKENIZERS)
def test_no_tool_call_token_means_none(tokenizer_pair, tokenizer_name):
    ours, _ = tokenizer_pair(tokenizer_name)
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {}}]'  # as text, not the control token
    assert parse_tool_calls(ours, ours.encode(text) + [ours.eos_id]) is None
    assert parse_tool_calls(ours, []) is None


def test_v1_never_has_calls():
    ours = load_tokenizer(mistral_common_data() / "tokenizer.model.v1")
    assert parse_tool_calls(ours, ours.encode('[TOOL_CALLS][{"name": "x"}]')) is None


@pytest.mark.parametrize("tokenizer_name", ["v3", "tekken-240911"])
def test_json_list_form_variants(tokenizer_pair, tokenizer_name):
    ours, _ = tokenizer_pair(tokenizer_name)
    marker = ours.special_id("[TOOL_CALLS]")
    # a single object, arguments given as a JSON string, no id, junk after </s>
    text = ' {"name": "get_weather", "arguments": "{\\"city\\": \\"Lyon\\"}"}'
    ids = [marker, *ours.encode(text), ours.eos_id, *ours.encode("junk")]
    (call,) = parse_tool_calls(ours, ids)
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Lyon"})
    assert len(call.id) == 9 and call.id.isalnum()
    # two [TOOL_CALLS] blocks in a row
    block = [marker, *ours.encode('[{"name": "ping", "arguments": {}}]')]
    assert [c.name for c in parse_tool_calls(ours, block + block)] == ["ping", "ping"]


@pytest.mark.parametrize("tokenizer_name", ["v3", "tekken-v11", "tekken-v13"])
def test_invalid_json_raises_with_the_text(tokenizer_pair, tokenizer_name):
    ours, _ = tokenizer_pair(tokenizer_name)
    marker = ours.special_id("[TOOL_CALLS]")
    if ours.version in ("v11", "v13"):
        ids = [marker, *ours.encode("get_weather"), ours.special_id("[ARGS]"), *ours.encode('{"city": "Par')]
    else:
        ids = [marker, *ours.encode('[{"name": "get_weather", "arguments": {"city": "Par')]
    with pytest.raises(ToolCallParseError, match="not valid JSON") as info:
        parse_tool_calls(ours, ids)
    assert isinstance(info.value, MistralChatError)
    assert "get_weather" in info.value.text and "Par" in info.value.text
    with pytest.raises(ToolCallParseError, match="no call"):
        parse_tool_calls(ours, [marker, ours.eos_id])
    with pytest.raises(ToolCallParseError, match="no function name"):
        parse_tool_calls(ours, [marker, *ours.encode('[{"arguments": {}}]')])


@pytest.mark.parametrize("tokenizer_name", ["v3", "v7", "tekken-v11", "tekken-v13"])
def test_parsed_calls_round_trip_into_the_conversation(tokenizer_pair, tokenizer_name):
    """A parsed call goes back into the conversation, with its result, as mistral-common would write it."""
    ours, reference = tokenizer_pair(tokenizer_name)
    generated = reference_call_ids(reference, [ZURICH, CLOCK])
    calls = parse_tool_calls(ours, generated)
    messages = [ChatMessage(U, "Zürich, and the time?"), call_turn(*calls),
                *[result(c, f"result {i}") for i, c in enumerate(calls)]]
    assert encode_conversation(ours, messages, TOOLS) == \
        reference.encode_chat_completion(reference_request(TOOLS, messages)).tokens


def test_new_ids_fit_every_version():
    ids = {new_tool_call_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 9 and i.isalnum() and i.isascii() for i in ids)


def test_tool_call_json():
    assert PARIS.to_json() == {"id": "abcDEF123", "type": "function",
                               "function": {"name": "get_weather", "arguments": PARIS.arguments}}


# ---------------------------------------------------------------------------------------------- tools files


def test_load_tools_openai_and_bare(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                          "parameters": WEATHER.parameters, "strict": True}},
        {"name": "ping"},
    ]), encoding="utf-8")
    assert load_tools(path) == [WEATHER, NO_ARGS]
    path.write_text(json.dumps({"tools": [{"name": "ping", "description": None, "parameters": None}]}))
    assert load_tools(path) == [NO_ARGS]
    path.write_text(json.dumps({"name": "ping"}))
    assert load_tools(path) == [NO_ARGS]


def test_load_tools_matches_mistral_common_dump(tmp_path):
    from mistral_common.protocol.instruct.tool_calls import Tool as ReferenceTool

    entry = {"type": "function", "function": {"name": "get-time", "description": TIME.description,
                                              "parameters": TIME.parameters}}
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([entry]), encoding="utf-8")
    (tool,) = load_tools(path)
    assert tool.to_json() == ReferenceTool.from_openai(entry).model_dump(exclude={"function": {"strict": True}})


@pytest.mark.parametrize("content, message", [
    ("[{", "not valid JSON"),
    ("[1]", "expected a function object"),
    ('[{"description": "x"}]', "function name None"),
    ('[{"name": "has space"}]', "function name 'has space'"),
    ('[{"name": "f", "parameters": []}]', "JSON schema object"),
    ('[{"type": "retrieval", "function": {"name": "f"}}]', "not supported"),
    ('[{"name": "f"}, {"name": "f"}]', "more than once"),
])
def test_bad_tools_file(tmp_path, content, message):
    path = tmp_path / "my_tools.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ToolsFileError, match=message) as info:
        load_tools(path)
    assert isinstance(info.value, MistralChatError)
    assert "my_tools.json" in str(info.value) and "\n" not in str(info.value)


def test_missing_tools_file(tmp_path):
    with pytest.raises(ToolsFileError, match="cannot read tools file .*nope.json"):
        load_tools(tmp_path / "nope.json")


def test_package_does_not_import_mistral_common():
    import subprocess

    code = ("import sys, mistral_chat.chat.tools, mistral_chat.chat.fim, mistral_chat.chat.templates; "
            "sys.exit('mistral_common' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
