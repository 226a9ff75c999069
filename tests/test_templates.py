"""encode_conversation gives exactly mistral-common's encode_chat_completion ids, for every tokenizer it ships."""

import pathlib

import pytest

from mistral_chat.chat.templates import ChatMessage, encode_conversation, instruct_format
from mistral_chat.errors import TokenizerError
from mistral_chat.text.tokenizer import load_tokenizer
from tiny_models import MISTRAL_COMMON_TOKENIZERS, mistral_common_data, write_small_tekken

FORMATS = {"v1": "v1", "v2": "v2", "v3": "v3", "v7": "v7", "v7m1": "v7", "tekken-240718": "tekken-v3",
           "tekken-240911": "tekken-v3"}  # the instruct format each shipped file implies
SHIPPED = {name: (MISTRAL_COMMON_TOKENIZERS[name], fmt) for name, fmt in FORMATS.items()}
# tekken files of later versions, made here from tekken_240911.json with a smaller vocabulary
SYNTHETIC = {"tekken-v7": "tekken-v7", "tekken-v13": "tekken-v13"}

S, U, A = "system", "user", "assistant"
CONVERSATIONS = {
    "single": [(U, "Hello, how are you?")],
    "multi_turn": [(U, "What is 2+2?"), (A, "2+2 is 4."), (U, "And 3+3?")],
    "three_turns": [(U, "a"), (A, "b"), (U, "c"), (A, "d"), (U, "e")],
    "system": [(S, "You are a pirate. Answer like one."), (U, "Hi there")],
    "system_multi_turn": [(S, "Be brief."), (U, "Name a colour."), (A, "Blue."), (U, "Another one?")],
    "two_systems": [(S, "Rule one."), (S, "Rule two."), (U, "Go")],
    "empty_system": [(S, ""), (U, "hello")],
    "unicode": [(U, "Grüße 🌍🚀 你好，世界 — ñ 👩‍👩‍👧‍👦"), (A, "こんにちは 👋 𓀀"), (U, "🎉")],
    "empty_user": [(U, "")],
    "empty_users": [(U, ""), (A, "ok"), (U, "")],
    "whitespace": [(U, "  leading and trailing  \n"), (A, "  answer with spaces   "), (U, "\tnext\n\n ")],
    "system_whitespace": [(S, " sys with spaces \n"), (U, " hi ")],
    "consecutive_users": [(U, "first part"), (U, "second part")],
    "consecutive_assistants": [(U, "q"), (A, "part one"), (A, "part two"), (U, "q2")],
    "assistant_first": [(A, "Hello! How can I help?"), (U, "Tell me a joke")],
    "control_text": [(U, "[INST] literal [/INST] <s></s> [SYSTEM_PROMPT]")],
    "newlines": [(S, "line1\nline2"), (U, "para1\n\npara2"), (A, "x\ny"), (U, "z")],
}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    data = mistral_common_data()
    files = {name: data / file for name, (file, _) in SHIPPED.items()}
    folder = tmp_path_factory.mktemp("tekken")
    write_small_tekken(folder / "tekken_v7.json", "v7")
    # a v13 file lists its own special tokens; ranks differ from the v3 defaults to show names are what counts
    specials = ["<unk>", "<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[TOOL_CALLS]",
                "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[IMG]", "<pad>",
                "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[TOOL_CONTENT]", "[ARGS]",
                "[CALL_ID]", "[THINK]", "[/THINK]"]  # fmt: skip
    write_small_tekken(folder / "tekken_v13.json", "v13", specials)
    files["tekken-v7"] = folder / "tekken_v7.json"
    files["tekken-v13"] = folder / "tekken_v13.json"
    return files


def reference_ids(mistral_tokenizer, conversation) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {S: SystemMessage, U: UserMessage, A: AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[role](content=content) for role, content in conversation])
    return mistral_tokenizer.encode_chat_completion(request).tokens


ALL_TOKENIZERS = list(SHIPPED) + list(SYNTHETIC)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("tokenizer_name", ALL_TOKENIZERS)
def test_ids_match_mistral_common(tokenizer_pair, tokenizer_name, conversation):
    ours, reference = tokenizer_pair(tokenizer_name)
    turns = CONVERSATIONS[conversation]
    ids = encode_conversation(ours, [ChatMessage(role, content) for role, content in turns])
    assert ids == reference_ids(reference, turns)


@pytest.mark.parametrize("tokenizer_name", ALL_TOKENIZERS)
def test_instruct_format(tokenizer_pair, tokenizer_name):
    ours, _ = tokenizer_pair(tokenizer_name)
    expected = SHIPPED[tokenizer_name][1] if tokenizer_name in SHIPPED else SYNTHETIC[tokenizer_name]
    assert instruct_format(ours) == expected


@pytest.mark.parametrize("tokenizer_name", ["v1", "v3", "v7", "tekken-240911", "tekken-v13"])
def test_ends_ready_for_the_answer(tokenizer_pair, tokenizer_name):
    ours, _ = tokenizer_pair(tokenizer_name)
    ids = encode_conversation(ours, [ChatMessage("system", "sys"), ChatMessage("user", "hi")])
    assert ids[0] == ours.bos_id
    if ours.version == "v1":
        assert ours.decode(ids).endswith("[/INST]")
    else:
        assert ids[-1] == ours.special_id("[/INST]")


@pytest.mark.parametrize("tokenizer_name", ["v3", "tekken-v7"])
def test_empty_assistant_answer_is_kept_as_eos(tokenizer_pair, tokenizer_name):
    ours, _ = tokenizer_pair(tokenizer_name)
    turns = [ChatMessage("user", "q"), ChatMessage("assistant", ""), ChatMessage("user", "again")]
    with_empty = encode_conversation(ours, turns)
    first = encode_conversation(ours, [ChatMessage("user", "q")])
    assert with_empty[: len(first) + 1] == first + [ours.eos_id]


def test_conversation_must_end_with_the_user(tokenizer_pair):
    ours, _ = tokenizer_pair("v3")
    with pytest.raises(ValueError, match="end with a user message"):
        encode_conversation(ours, [ChatMessage("user", "q"), ChatMessage("assistant", "a")])
    with pytest.raises(ValueError):
        encode_conversation(ours, [])
    with pytest.raises(ValueError, match="role"):
        encode_conversation(ours, [ChatMessage("tool", "x"), ChatMessage("user", "q")])  # type: ignore[arg-type]


def test_missing_control_token_is_a_tokenizer_error(tmp_path, tokenizer_files):
    # a v7 file that does not have [SYSTEM_PROMPT]: the user is told which token and file
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    path = tmp_path / "tekken.json"
    write_small_tekken(path, "v7", specials)
    ours = load_tokenizer(tmp_path)
    assert encode_conversation(ours, [ChatMessage("user", "hi")])[-1] == ours.special_id("[/INST]")
    with pytest.raises(TokenizerError, match=r"SYSTEM_PROMPT.*tekken.json|tekken.json.*SYSTEM_PROMPT"):
        encode_conversation(ours, [ChatMessage("system", "s"), ChatMessage("user", "hi")])
