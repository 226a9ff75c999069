"""Which files of a repository or folder the engine needs: one checkpoint format, never both."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mistral_chat.errors import ModelFilesError

FormatChoice = Literal["auto", "native", "hf"]

_NATIVE_SHARD = re.compile(r"^consolidated-(\d{5})-of-(\d{5})\.safetensors$")
_HF_SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
_SPM_VERSIONED = re.compile(r"^tokenizer\.model\.v(\d+)(?:m(\d+))?$")


@dataclass(frozen=True)
class FileSelection:
    """The files to fetch or load: checkpoint format, file names (repo-relative) and the tokenizer file among them."""

    format: Literal["native", "hf"]
    files: tuple[str, ...]
    tokenizer: str


def pick_tokenizer(names: Iterable[str]) -> str | None:
    """mistral-common's rule: tekken.json wins, else the highest tokenizer.model.vN, else tokenizer.model."""
    names = set(names)
    if "tekken.json" in names:
        return "tekken.json"
    versioned = [(int(m.group(1)), int(m.group(2) or 0), n) for n in names if (m := _SPM_VERSIONED.match(n))]
    if versioned:
        return max(versioned)[2]
    return "tokenizer.model" if "tokenizer.model" in names else None


def instruct_format(tokenizer: str, vocab_size: int) -> str:
    """The instruct (chat template) version a tokenizer file implies: v1, v2, v3, v7, ... or tekken."""
    if tokenizer == "tekken.json":
        return "tekken"
    if m := _SPM_VERSIONED.match(tokenizer):
        return f"v{m.group(1)}"
    return "v1" if vocab_size == 32000 else "v3"


def _complete_shards(names: set[str], pattern: re.Pattern[str]) -> list[str] | None:
    shards = sorted(n for n in names if pattern.match(n))
    if not shards:
        return None
    totals = {int(pattern.match(n).group(2)) for n in shards}  # type: ignore[union-attr]
    if len(totals) != 1 or len(shards) != totals.pop():
        return None
    return shards


def _native_weights(names: set[str]) -> list[str] | None:
    if "params.json" not in names:
        return None
    if "consolidated.safetensors" in names:
        return ["consolidated.safetensors"]
    shards = _complete_shards(names, _NATIVE_SHARD)
    if shards is None:
        return None
    return shards + [n for n in ("consolidated.safetensors.index.json",) if n in names]


def _hf_weights(names: set[str]) -> list[str] | None:
    if "config.json" not in names:
        return None
    if "model.safetensors" in names:
        return ["model.safetensors"]
    shards = _complete_shards(names, _HF_SHARD)
    if shards is None:
        return None
    return shards + [n for n in ("model.safetensors.index.json",) if n in names]


def select_files(names: Iterable[str], fmt: FormatChoice = "auto", source: str = "the repository") -> FileSelection:
    """Choose native files when present (or asked for), else Hugging Face files; raise when neither is usable."""
    top_level = {n for n in names if "/" not in n}
    tokenizer = pick_tokenizer(top_level)
    native = _native_weights(top_level)
    hf = _hf_weights(top_level)
    if tokenizer is None and (native or hf):
        raise ModelFilesError(
            f"{source} has weights but no tokenizer file mistral-chat reads (tekken.json or tokenizer.model[.vN]): "
            "use a repository that ships Mistral's tokenizer"
        )
    if fmt == "native" and native is None:
        raise ModelFilesError(
            f"{source} has no native-format weights (params.json + consolidated*.safetensors): "
            "run again with --format hf or --format auto"
        )
    if fmt == "hf" and hf is None:
        raise ModelFilesError(
            f"{source} has no Hugging Face-format weights (config.json + model*.safetensors): "
            "run again with --format native or --format auto"
        )
    if native is not None and fmt in ("auto", "native"):
        return FileSelection("native", tuple(["params.json", *native, tokenizer]), tokenizer)  # type: ignore[list-item]
    if hf is not None:
        return FileSelection("hf", tuple(["config.json", *hf, tokenizer]), tokenizer)  # type: ignore[list-item]
    raise ModelFilesError(
        f"{source} is not a model mistral-chat can run: it needs params.json + consolidated.safetensors (native) "
        "or config.json + model*.safetensors (Hugging Face) and a tokenizer; .bin/.pth/GGUF weights are not read"
    )


def select_local_files(model_dir: Path, fmt: FormatChoice = "auto") -> FileSelection:
    """`select_files` over the files of a folder."""
    try:
        names = [p.name for p in Path(model_dir).iterdir()]
    except PermissionError as exc:
        raise ModelFilesError(f"cannot read the model folder {model_dir} (permission denied): give your user read "
                              "access to it (chmod u+rx, or chmod -R u+rX for its files)") from exc
    except OSError as exc:
        raise ModelFilesError(f"cannot read the model folder {model_dir} ({exc.strerror or exc}): "
                              "check the path") from exc
    return select_files(names, fmt, source=str(model_dir))
