"""Shared test setup: tests/ on sys.path (tiny_models, hub_server, tui_helpers), and shared fixtures."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tokenizer_pair(tokenizer_files):
    """(ours, mistral-common's) tokenizer per name of the module's `tokenizer_files`, each loaded once."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mistral_chat.text.tokenizer import load_tokenizer

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = tokenizer_files[name]
            cache[name] = (load_tokenizer(path), MistralTokenizer.from_file(str(path)))
        return cache[name]

    return get
