"""Tekken tokenizers (`tekken.json`): byte-level BPE run by tiktoken.

The json holds `vocab` (rank, base64 `token_bytes`), optional `special_tokens` (rank, token_str), and `config`
(`pattern`, `default_vocab_size`, `default_num_special_tokens`, `version`). Ids below the number of special
tokens are special; a vocabulary token of rank r has id r + number of special tokens. Files without a
`special_tokens` list (the v3 ones) use the 20 tokens mistral-common assigns them, the rest of the special
range is filled with "<SPECIAL_i>".

Decoding joins the bytes of consecutive ordinary tokens and decodes them as UTF-8 with U+FFFD for bad
bytes (tiktoken's rule); special tokens decode to "" and end the byte group before them.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_chat.errors import TokenizerError
from mistral_chat.text.base import Tokenizer

# special tokens of tekken files that do not list their own (mistral-common's defaults, by rank)
DEFAULT_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)  # fmt: skip


@dataclass
class TekkenStream:
    """Decoder state: an incremental UTF-8 decoder that keeps an unfinished character until it completes."""

    tokenizer: TekkenTokenizer
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def push(self, token_id: int) -> str:
        self.tokenizer.check_id(token_id)
        if token_id < self.tokenizer.num_special:
            return self.flush()
        return self.utf8.decode(self.tokenizer.token_bytes[token_id - self.tokenizer.num_special])

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read tekken tokenizer {path}: {exc}; download the model again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or "vocab" not in data:
        raise TokenizerError(f"{path} is not a tekken tokenizer (no config or vocab); download the model again")
    return data


class TekkenTokenizer(Tokenizer):
    is_tekken = True

    def __init__(self, path: Path) -> None:
        import tiktoken

        self.path = Path(path)
        data = _read_json(self.path)
        config = data["config"]
        try:
            self.version = str(config["version"])
            if not re.fullmatch(r"v\d+", self.version):
                raise ValueError(f"unknown version {self.version!r}")
            self.vocab_size = int(config["default_vocab_size"])
            self.num_special = int(config["default_num_special_tokens"])
            pattern = str(config["pattern"])
            special_names = self._special_names(data.get("special_tokens"))
            inner_size = self.vocab_size - self.num_special
            vocab = data["vocab"][:inner_size]
            if len(vocab) < inner_size:
                raise ValueError(f"{len(vocab)} vocabulary tokens, config asks for {inner_size}")
            self.token_bytes = [base64.b64decode(entry["token_bytes"]) for entry in vocab]
            ranks = {token: rank for rank, token in enumerate(self.token_bytes)}
            if len(ranks) != inner_size:
                raise ValueError("duplicate vocabulary tokens")
            self._model = tiktoken.Encoding(
                name=self.path.stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenizerError(
                f"{self.path} is not a valid tekken tokenizer ({exc}); download the model again"
            ) from exc
        self._specials = {name: rank for rank, name in enumerate(special_names)}
        self.bos_id = self.special_id("<s>")
        self.eos_id = self.special_id("</s>")

    def _special_names(self, listed: list[dict[str, Any]] | None) -> list[str]:
        if listed is None:
            if int(self.version[1:]) > 7:
                raise ValueError(f"tokenizer {self.version} must list its special_tokens")
            names = list(DEFAULT_SPECIAL_TOKENS)
        else:
            by_rank = sorted(listed, key=lambda t: int(t["rank"]))
            if [int(t["rank"]) for t in by_rank] != list(range(len(by_rank))):
                raise ValueError("special token ranks are not 0..n-1")
            names = [str(t["token_str"]) for t in by_rank]
        if len(names) > self.num_special or len(set(names)) != len(names):
            raise ValueError(f"{len(names)} special tokens for {self.num_special} special ids, or duplicates")
        return names + [f"<SPECIAL_{i}>" for i in range(len(names), self.num_special)]

    _file_hint = "the tekken.json that came with the model"

    def encode_text(self, text: str) -> list[int]:
        offset = self.num_special
        return [token + offset for token in self._model.encode_ordinary(text)]

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.num_special

    def incremental_decoder(self) -> TekkenStream:
        return TekkenStream(self)
