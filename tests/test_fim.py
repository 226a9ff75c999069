"""encode_fim gives exactly mistral-common's MistralTokenizer.encode_fim ids for every tokenizer with FIM tokens."""

import pytest

from mistral_chat.chat.fim import encode_fim, supports_fim
from mistral_chat.errors import MistralChatError, TokenizerError
from mistral_chat.text.tokenizer import load_tokenizer
from tiny_models import MISTRAL_COMMON_TOKENIZERS, mistral_common_data, write_small_tekken

NO_FIM_FILES = {name: MISTRAL_COMMON_TOKENIZERS[name] for name in ("v1", "v2")}
FIM_FILES = {name: file for name, file in MISTRAL_COMMON_TOKENIZERS.items() if name not in NO_FIM_FILES}

PAIRS = {
    "code": ("def add(a, b):\n    ", "\n    return c\n\nprint(add(1, 2))\n"),
    "empty_suffix": ("import numpy as np\n\ndef mean(xs):\n", ""),
    "empty_prefix": ("", "    return x\n"),
    "both_empty": ("", ""),
    "unicode": ("# Grüße 🌍 你好\ns = \"", "\"  # ñ 👩‍👩‍👧‍👦\n"),
    "suffix_space": ("x = ", " + 1"),
    "suffix_punct": ("xs = [1, 2", "]\n"),
    "suffix_newline": ("if a:", "\n    pass"),
    "suffix_smiley": ("say(", "☺)"),
    "control_text": ("[PREFIX] <s>", "[SUFFIX] </s>"),
    "indent": ("class A:\n\tdef f(self):\n\t\t", "\n\t\treturn 1"),
}


V13_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
             "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
             "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]", "[ARGS]",
             "[CALL_ID]"]  # fmt: skip


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(ours, mistral-common's) per tokenizer name, each loaded once."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    files = {name: mistral_common_data() / file for name, file in {**FIM_FILES, **NO_FIM_FILES}.items()}
    files["tekken-v13"] = write_small_tekken(tmp_path_factory.mktemp("tekken") / "tekken_v13.json", "v13", V13_SPECIALS)
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = (load_tokenizer(files[name]), MistralTokenizer.from_file(str(files[name])))
        return cache[name]

    return get


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("tokenizer_name", list(FIM_FILES) + ["tekken-v13"])
def test_ids_match_mistral_common(loaded, tokenizer_name, pair):
    from mistral_common.protocol.fim.request import FIMRequest

    ours, reference = loaded(tokenizer_name)
    prefix, suffix = PAIRS[pair]
    assert supports_fim(ours)
    expected = reference.encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens
    assert encode_fim(ours, prefix, suffix) == expected


@pytest.mark.parametrize("tokenizer_name", ["v3", "tekken-240911"])
def test_layout(loaded, tokenizer_name):
    ours, _ = loaded(tokenizer_name)
    ids = encode_fim(ours, "a = ", "\nb = 2")
    assert ids[:2] == [ours.bos_id, ours.special_id("[SUFFIX]")]
    at_prefix = ids.index(ours.special_id("[PREFIX]"))
    assert ours.decode(ids[2:at_prefix]) == "\nb = 2"
    assert ids[at_prefix + 1:] == ours.encode("a = ")


@pytest.mark.parametrize("tokenizer_name", list(NO_FIM_FILES))
def test_unsupported_tokenizer_is_a_user_error(loaded, tokenizer_name):
    ours, _ = loaded(tokenizer_name)
    assert not supports_fim(ours)
    with pytest.raises(TokenizerError, match="does not support fill-in-the-middle") as info:
        encode_fim(ours, "def f(", ")")
    assert isinstance(info.value, MistralChatError)
    assert "\n" not in str(info.value)
