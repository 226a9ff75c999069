"""Tokenizers against mistral-common's (and so sentencepiece's / tiktoken's) on the real files it ships."""

import pathlib
import random

import pytest

from mistral_chat.errors import TokenizerError
from mistral_chat.text.tokenizer import StreamDecoder, Tokenizer, find_tokenizer_file, load_tokenizer
from tiny_models import MISTRAL_COMMON_TOKENIZERS, mistral_common_data

FILES = {name: MISTRAL_COMMON_TOKENIZERS[name] for name in ("v1", "v2", "v3", "v7", "tekken-240718", "tekken-240911")}

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces   ",
    "line one\nline two\n\n\ttabbed\r\n",
    "Grüße aus Köln — naïve café, ñandú",
    "你好，世界！これは日本語のテキストです。한국어도 있어요.",
    "emoji 🌍🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, skin 👍🏽",
    "math ∑∫√∞ ≠ ≤ ≥ and arrows ⇒ ⟶, rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀",
    "[INST] not a control token [/INST] <s> </s>",
    "code:\n```python\ndef f(x):\n    return x ** 2  # 😀\n```",
    " ",
    "\u2581already a sentencepiece space",
]


@pytest.fixture(scope="module", params=list(FILES))
def pair(request):
    """(our tokenizer, mistral-common's raw tokenizer) for one shipped file, loaded once per module."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = mistral_common_data() / FILES[request.param]
    ours = load_tokenizer(path)
    ref = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    return ours, ref


def random_ids(tokenizer: Tokenizer, rng: random.Random, length: int) -> list[int]:
    """Ids biased towards the hard cases: byte tokens, specials, the unknown token, and anything else."""
    byte_lo = _byte_id(tokenizer, 0)
    special_hi = 25
    ids = []
    for _ in range(length):
        r = rng.random()
        if r < 0.1:
            ids.append(rng.randrange(0, special_hi))
        elif r < 0.6:
            ids.append(byte_lo + rng.randrange(256))
        else:
            ids.append(rng.randrange(tokenizer.vocab_size))
    return ids


def streamed(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    stream = StreamDecoder(tokenizer)
    return [stream.push(i) for i in ids] + [stream.flush()]


# --- which file ---------------------------------------------------------------------------------------------


def touch(folder: pathlib.Path, *names: str) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    "names, expected",
    [
        (["tokenizer.model"], "tokenizer.model"),
        (["tokenizer.model", "tokenizer.model.v3"], "tokenizer.model.v3"),
        (["tokenizer.model.v1", "tokenizer.model.v3", "tokenizer.model.v7"], "tokenizer.model.v7"),
        (["tokenizer.model.v7", "tokenizer.model.v13"], "tokenizer.model.v13"),
        (["tokenizer.model.v3", "tokenizer.model.v7m1"], "tokenizer.model.v7m1"),
        (["tekken.json", "tokenizer.model.v3"], "tekken.json"),
        (["tekken.json", "tokenizer.model", "config.json", "params.json"], "tekken.json"),
        (["consolidated.safetensors", "params.json", "tokenizer.model.v2"], "tokenizer.model.v2"),
    ],
)
def test_find_tokenizer_file(tmp_path, names, expected):
    assert find_tokenizer_file(touch(tmp_path / "model", *names)) == tmp_path / "model" / expected


def test_missing_tokenizer_names_the_folder(tmp_path):
    folder = touch(tmp_path / "my-model", "config.json", "model.safetensors", "tokenizer.json")
    with pytest.raises(TokenizerError, match="my-model"):
        find_tokenizer_file(folder)
    with pytest.raises(TokenizerError, match="my-model"):
        load_tokenizer(folder)
    with pytest.raises(TokenizerError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_corrupt_files_give_tokenizer_errors(tmp_path):
    (tmp_path / "tekken.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tekken.json"):
        load_tokenizer(tmp_path)
    spm_dir = touch(tmp_path / "spm", "tokenizer.model.v3")
    (spm_dir / "tokenizer.model.v3").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model.v3"):
        load_tokenizer(spm_dir)


def test_load_from_folder_uses_the_chosen_file(tmp_path):
    import shutil

    data = mistral_common_data()
    shutil.copy(data / FILES["v1"], tmp_path / "tokenizer.model")
    shutil.copy(data / FILES["v3"], tmp_path / "tokenizer.model.v3")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.path == tmp_path / "tokenizer.model.v3"
    assert (tokenizer.version, tokenizer.vocab_size, tokenizer.is_tekken) == ("v3", 32768, False)
    bare = load_tokenizer(tmp_path / "tokenizer.model")
    assert (bare.version, bare.vocab_size) == ("v1", 32000)


# --- against mistral-common ---------------------------------------------------------------------------------


def test_properties(pair):
    ours, ref = pair
    assert ours.version == ref.version.value
    assert ours.is_tekken == (ours.path.suffix == ".json")
    assert ours.vocab_size == ref.n_words
    assert (ours.bos_id, ours.eos_id) == (ref.bos_id, ref.eos_id)
    for token_id in range(min(ours.vocab_size, 1100)):
        assert ours.is_special(token_id) == ref.is_special(token_id), token_id


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_mistral_common(pair, text):
    ours, ref = pair
    for bos, eos in [(False, False), (True, False), (True, True)]:
        assert ours.encode(text, bos=bos, eos=eos) == ref.encode(text, bos=bos, eos=eos)
    ids = ours.encode(text, bos=True, eos=True)
    assert ours.decode(ids) == ref.decode(ids)
    assert "".join(streamed(ours, ids)) == ref.decode(ids)


def test_special_ids(pair):
    ours, ref = pair
    names = ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[SYSTEM_PROMPT]"]
    for name in names:
        try:
            expected = ref.get_special_token(name)
            present = ref.is_special(expected)
        except ValueError:
            present = False
        if present:
            assert ours.special_id(name) == expected
            assert ours.is_special(expected)
        else:
            with pytest.raises(TokenizerError, match=r"\[|<"):
                ours.special_id(name)
    with pytest.raises(TokenizerError):
        ours.special_id("hello")


def test_random_ids_decode_and_stream_like_mistral_common(pair):
    ours, ref = pair
    rng = random.Random(1234)
    for _ in range(1500):
        ids = random_ids(ours, rng, rng.randint(1, 24))
        expected = ref.decode(ids)
        assert ours.decode(ids) == expected, ids
        assert "".join(streamed(ours, ids)) == expected, ids


@pytest.mark.parametrize("text", TEXTS)
def test_stream_never_splits_a_character(pair, text):
    ours, _ = pair
    ids = ours.encode(text)
    deltas = streamed(ours, ids)
    assert "".join(deltas) == ours.decode(ids)
    assert "\ufffd" not in "".join(deltas)
    if "\u2581" not in text:  # sentencepiece reads "\u2581" as a space
        assert ours.decode(ids) == text  # both round-trip (sentencepiece drops its dummy prefix space)


def test_stream_holds_back_a_split_emoji(pair):
    ours, _ = pair
    ids = [ours.bos_id] + [_byte_id(ours, b) for b in "🌍".encode()]
    deltas = streamed(ours, ids)
    assert deltas == ["", "", "", "", "🌍", ""]


def _byte_id(tokenizer: Tokenizer, byte: int) -> int:
    """The id of the token that is exactly one byte (tekken: rank = byte; sentencepiece: the <0xNN> piece)."""
    if tokenizer.is_tekken:
        return tokenizer.num_special + byte
    return tokenizer.table.byte_values.index(byte)


def test_stream_cut_by_a_special_token(pair):
    ours, ref = pair
    euro = "€".encode()
    byte_ids = [_byte_id(ours, b) for b in euro]
    ids = byte_ids[:1] + [ours.eos_id] + byte_ids[1:] + byte_ids
    assert "".join(streamed(ours, ids)) == ref.decode(ids) == ours.decode(ids)
    assert ours.decode(ids).endswith("€")
    assert ours.decode(byte_ids[:2]) == ref.decode(byte_ids[:2])  # an unfinished character at the end


def test_leading_space_of_an_answer(pair):
    ours, ref = pair
    answer = ours.encode("Sure! Here is 🌍 and more.")
    prompt = ours.encode("question", bos=True) + [ours.eos_id]
    for ids in (answer, prompt + answer, [ours.bos_id] + answer):
        assert "".join(streamed(ours, ids)) == ref.decode(ids)


def test_out_of_range_ids(pair):
    ours, _ = pair
    for bad in (-1, ours.vocab_size):
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            StreamDecoder(ours).push(bad)
