"""The one interface every tokenizer (sentencepiece, tekken) offers to the engine, the chat layer and the TUI."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from mistral_chat.errors import TokenizerError


class IncrementalDecoder(Protocol):
    """Turns token ids into text one id at a time; what `StreamDecoder` wraps."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


def version_number(version: str) -> int:
    """The N of a version string "vN" ("v13" -> 13)."""
    match = re.fullmatch(r"v(\d+)", version)
    if match is None:
        raise ValueError(f"not a tokenizer version: {version!r} (expected v1, v2, v3, v7, v11, ...)")
    return int(match.group(1))


class Tokenizer(ABC):
    """Text <-> token ids for one model.

    `decode` drops special (control) tokens, as mistral-common does; a special token also ends any
    unfinished UTF-8 byte sequence before it. Subclasses define `incremental_decoder`, and `decode` is
    built on it, so streamed text and decoded text are the same by construction.
    """

    path: Path
    version: str  # "v1" | "v2" | "v3" | "v7" | "v11" | "v13" | ...
    is_tekken: bool
    vocab_size: int
    bos_id: int
    eos_id: int
    _specials: dict[str, int]  # special token name -> id
    _file_hint: str  # which tokenizer file the user should use, for error messages

    @property
    def version_number(self) -> int:
        return version_number(self.version)

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text; special tokens are never produced from text."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """encode_text, optionally with the BOS token before and the EOS token after."""
        ids = self.encode_text(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def special_id(self, name: str) -> int:
        """The id of a special token such as "[INST]"; TokenizerError if this tokenizer lacks it."""
        try:
            return self._specials[name]
        except KeyError:
            raise TokenizerError(
                f"the tokenizer {self.path} ({self.version}) has no special token {name!r}; "
                f"use {self._file_hint}"
            ) from None

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether the id is a special (control) token, which decodes to ""."""

    @abstractmethod
    def incremental_decoder(self) -> IncrementalDecoder:
        """A fresh decoder state for one stream of ids."""

    def decode(self, ids: Sequence[int]) -> str:
        decoder = self.incremental_decoder()
        parts = [decoder.push(token_id) for token_id in ids]
        parts.append(decoder.flush())
        return "".join(parts)

    def check_id(self, token_id: int) -> None:
        """TokenizerError for an id outside the vocabulary (a model that does not fit this tokenizer)."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary of {self.path} ({self.vocab_size} tokens); "
                "the model and its tokenizer file do not match - check the model folder"
            )

    def __repr__(self) -> str:
        kind = "tekken" if self.is_tekken else "sentencepiece"
        return f"<{type(self).__name__} {kind} {self.version} vocab={self.vocab_size} {self.path}>"
