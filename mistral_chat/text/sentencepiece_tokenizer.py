"""Sentencepiece tokenizers (`tokenizer.model`, `tokenizer.model.v1|v2|v3|v7...`).

Encoding goes through the sentencepiece library. Decoding is done here, from a table of pieces, with
sentencepiece's own rules (so that streaming can follow them token by token):

- control tokens (<s>, </s>, [INST], ...) decode to "";
- the unknown token decodes to its surface (" \u2047 ");
- "\u2581" stands for a space; the one that starts the text (the dummy prefix the encoder added) is dropped,
  if no other text (bytes or the unknown token included) came before it;
- byte tokens <0xNN> are collected into runs; a run is decoded one character at a time, and each byte that
  does not start a valid UTF-8 character becomes U+FFFD. Any other token ends a run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mistral_chat.errors import TokenizerError
from mistral_chat.text.base import Tokenizer

SPACE = "\u2581"
REPLACEMENT = "\ufffd"
_VERSION_SUFFIX = re.compile(r"\.model\.(v\d+)(m\d+)?$")

# kinds of piece
_NORMAL, _CONTROL, _UNKNOWN, _BYTE = 0, 1, 2, 3


def sentencepiece_version(path: Path) -> str:
    """The version a sentencepiece file's name carries: tokenizer.model.v3 -> "v3", v7m1 -> "v7", .model -> "v1"."""
    match = _VERSION_SUFFIX.search(path.name)
    if match:
        return match.group(1)
    if path.name.endswith(".model"):
        return "v1"
    raise TokenizerError(
        f"{path} is not a sentencepiece tokenizer file name; expected tokenizer.model or tokenizer.model.vN"
    )


def utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 character a lead byte announces, 0 if it cannot start one (sentencepiece's rule)."""
    if lead < 0x80:
        return 1
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 0


def take_char(run: bytearray, final: bool) -> str | None:
    """Remove and return the first character of a byte run (U+FFFD for a bad byte); None if more bytes may come."""
    need = utf8_length(run[0])
    if need and len(run) < need and not final:
        return None
    if need and len(run) >= need:
        try:
            char = bytes(run[:need]).decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            del run[:need]
            return char
    del run[0]
    return REPLACEMENT


@dataclass
class PieceTable:
    """What each id decodes to: its kind, its text (spaces restored) and, for byte pieces, the byte."""

    kinds: list[int]
    texts: list[str]
    byte_values: list[int]


@dataclass
class SentencePieceStream:
    """Decoder state: the pending byte run and whether the leading dummy space is still to be dropped."""

    tokenizer: SentencePieceTokenizer
    run: bytearray = field(default_factory=bytearray)
    at_start: bool = True

    def push(self, token_id: int) -> str:
        self.tokenizer.check_id(token_id)
        table = self.tokenizer.table
        kind = table.kinds[token_id]
        if kind == _BYTE:
            self.run.append(table.byte_values[token_id])
            self.at_start = False  # a byte always decodes to something, so the dummy space is behind us
            return self._drain(final=False)
        text = self._drain(final=True)
        if kind == _CONTROL:
            return text
        surface = table.texts[token_id]
        if self.at_start:
            if kind == _NORMAL and surface.startswith(" "):
                surface = surface[1:]
                self.at_start = False
            elif surface:
                self.at_start = False
        return text + surface

    def flush(self) -> str:
        return self._drain(final=True)

    def _drain(self, final: bool) -> str:
        chars: list[str] = []
        while self.run:
            char = take_char(self.run, final)
            if char is None:
                break
            chars.append(char)
        return "".join(chars)


class SentencePieceTokenizer(Tokenizer):
    is_tekken = False

    def __init__(self, path: Path) -> None:
        from sentencepiece import SentencePieceProcessor

        self.path = Path(path)
        self.version = sentencepiece_version(self.path)
        try:
            self._model = SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(
                f"cannot read sentencepiece tokenizer {self.path}: {exc}; download the model again"
            ) from exc
        model = self._model
        self.vocab_size = model.get_piece_size()
        self.bos_id = model.bos_id()
        self.eos_id = model.eos_id()
        self.unk_id = model.unk_id()
        self.table = self._build_table()
        self._specials = {model.id_to_piece(i): i for i, kind in enumerate(self.table.kinds) if kind == _CONTROL}
        if self.unk_id >= 0:
            self._specials[model.id_to_piece(self.unk_id)] = self.unk_id

    def _build_table(self) -> PieceTable:
        model = self._model
        kinds: list[int] = []
        texts: list[str] = []
        byte_values: list[int] = []
        for i in range(self.vocab_size):
            piece = model.id_to_piece(i)
            byte = -1
            if model.is_control(i):
                kind, text = _CONTROL, ""
            elif model.is_unknown(i):
                # the unknown piece decodes to the model's unk surface (" \u2047 " unless the model sets another)
                kind, text = _UNKNOWN, model.decode([i])
            elif model.is_byte(i):
                kind, text, byte = _BYTE, "", int(piece[1:-1], 16)
            else:
                kind, text = _NORMAL, piece.replace(SPACE, " ")
            kinds.append(kind)
            texts.append(text)
            byte_values.append(byte)
        return PieceTable(kinds, texts, byte_values)

    _file_hint = "the tokenizer file that came with the model (a newer tokenizer.model.vN)"

    def encode_text(self, text: str) -> list[int]:
        return list(self._model.encode(text))

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and self.table.kinds[token_id] == _CONTROL

    def incremental_decoder(self) -> SentencePieceStream:
        return SentencePieceStream(self)
