"""Finding and loading a model's tokenizer: sentencepiece (`tokenizer.model[.vN]`) or tekken (`tekken.json`).

    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode("Hello", bos=True)
    stream = StreamDecoder(tokenizer)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mistral_chat.errors import TokenizerError
from mistral_chat.text.base import Tokenizer
from mistral_chat.text.sentencepiece_tokenizer import SentencePieceTokenizer
from mistral_chat.text.stream import StreamDecoder
from mistral_chat.text.tekken_tokenizer import TekkenTokenizer

__all__ = [
    "SentencePieceTokenizer",
    "StreamDecoder",
    "TekkenTokenizer",
    "Tokenizer",
    "find_tokenizer_file",
    "load_tokenizer",
]

log = logging.getLogger(__name__)

TEKKEN_FILE = "tekken.json"
_SENTENCEPIECE_NAME = re.compile(r".*\.model(?:\.v(\d+)(?:m\d+)?)?")


def _sentencepiece_rank(name: str) -> int | None:
    """Version number of a sentencepiece file name (tokenizer.model counts as 0), None for other files."""
    match = _SENTENCEPIECE_NAME.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1)) if match.group(1) else 0


def find_tokenizer_file(model_dir: Path) -> Path:
    """The tokenizer file of a model folder.

    tekken.json wins; else the sentencepiece file of the highest version (tokenizer.model.v7 over .v3, v13 over
    v7, any .vN over a bare tokenizer.model), the rule mistral-common applies when a folder has several.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TokenizerError(f"model folder {model_dir} does not exist; check the path or pull the model again")
    if (model_dir / TEKKEN_FILE).is_file():
        return model_dir / TEKKEN_FILE
    candidates: list[tuple[int, str, Path]] = []
    for path in model_dir.iterdir():
        rank = _sentencepiece_rank(path.name)
        if rank is not None and path.is_file():
            candidates.append((rank, path.name, path))
    if not candidates:
        raise TokenizerError(
            f"no tokenizer in {model_dir}: expected tekken.json, tokenizer.model or tokenizer.model.vN; "
            "pull the model again or copy its tokenizer file there"
        )
    candidates.sort()
    chosen = candidates[-1][2]
    if len(candidates) > 1:
        log.info("several tokenizer files in %s, using %s", model_dir, chosen.name)
    return chosen


def load_tokenizer(model_dir_or_file: Path) -> Tokenizer:
    """The tokenizer of a model folder (see `find_tokenizer_file`) or of one tokenizer file."""
    path = Path(model_dir_or_file)
    if path.is_dir():
        path = find_tokenizer_file(path)
    elif not path.is_file():
        raise TokenizerError(f"tokenizer file or model folder {path} does not exist; check the path")
    if path.suffix == ".json":
        return TekkenTokenizer(path)
    if _sentencepiece_rank(path.name) is not None:
        return SentencePieceTokenizer(path)
    raise TokenizerError(
        f"{path} is not a tokenizer file; expected tekken.json, tokenizer.model or tokenizer.model.vN"
    )
