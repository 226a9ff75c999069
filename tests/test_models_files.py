"""Which files a pull fetches: one format, the right tokenizer, complete shards."""

from __future__ import annotations

import pytest

from mistral_chat.errors import ModelFilesError
from mistral_chat.models.catalogue import CATALOGUE, close_names, lookup_alias, looks_like_repo_id
from mistral_chat.models.files import instruct_format, pick_tokenizer, select_files

MISTRAL_7B_V03 = [  # the real repository's files
    ".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
    "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
    "model.safetensors.index.json", "params.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "tokenizer.model.v3", "tokenizer_config.json",
]


def test_native_preferred_and_never_both() -> None:
    sel = select_files(MISTRAL_7B_V03)
    assert sel.format == "native"
    assert sel.files == ("params.json", "consolidated.safetensors", "tokenizer.model.v3")


def test_hf_on_request() -> None:
    sel = select_files(MISTRAL_7B_V03, "hf")
    assert sel.format == "hf"
    assert sel.files == ("config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                         "model-00003-of-00003.safetensors", "model.safetensors.index.json", "tokenizer.model.v3")


def test_native_shards_with_index() -> None:
    names = ["params.json", "consolidated-00001-of-00002.safetensors", "consolidated-00002-of-00002.safetensors",
             "consolidated.safetensors.index.json", "tokenizer.model.v3", "config.json"]
    assert select_files(names).files == ("params.json", *names[1:4], "tokenizer.model.v3")


def test_incomplete_shards_fall_back_or_fail() -> None:
    names = ["params.json", "consolidated-00001-of-00002.safetensors", "tokenizer.model"]
    with pytest.raises(ModelFilesError, match="not a model mistral-chat can run"):
        select_files(names)


@pytest.mark.parametrize("names, expected", [
    (["tokenizer.model", "tokenizer.model.v3", "tekken.json"], "tekken.json"),
    (["tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v7"], "tokenizer.model.v7"),
    (["tokenizer.model.v2", "tokenizer.model.v10"], "tokenizer.model.v10"),
    (["tokenizer.model"], "tokenizer.model"),
    (["tokenizer.json"], None),
])
def test_tokenizer_rule(names: list[str], expected: str | None) -> None:
    assert pick_tokenizer(names) == expected


def test_instruct_format() -> None:
    assert instruct_format("tekken.json", 131072) == "tekken"
    assert instruct_format("tokenizer.model.v7", 32768) == "v7"
    assert instruct_format("tokenizer.model", 32000) == "v1"
    assert instruct_format("tokenizer.model", 32768) == "v3"


def test_no_tokenizer_or_no_weights() -> None:
    with pytest.raises(ModelFilesError, match="no tokenizer file"):
        select_files(["config.json", "model.safetensors", "tokenizer.json"])
    with pytest.raises(ModelFilesError, match="no native-format weights"):
        select_files(["config.json", "model.safetensors", "tokenizer.model"], "native")
    with pytest.raises(ModelFilesError, match="not a model"):
        select_files(["config.json", "pytorch_model.bin", "tokenizer.model"])


def test_catalogue() -> None:
    entry = lookup_alias("Mistral-7B-Instruct")
    assert entry is not None and entry.repo_id == "mistralai/Mistral-7B-Instruct-v0.3"
    assert CATALOGUE["nemo-instruct"].repo_id == "mistralai/Mistral-Nemo-Instruct-2407"
    assert "mixtral-8x7b-instruct" in close_names("mixtral-8x7b")
    assert looks_like_repo_id("mistralai/Codestral-22B-v0.1") and not looks_like_repo_id("codestral")
