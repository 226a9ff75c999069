"""Model hyper-parameters, read from a native `params.json` or a Hugging Face `config.json`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from mistral_chat.errors import ModelFilesError

log = logging.getLogger(__name__)

CheckpointFormat = Literal["native", "hf"]

# params.json keys we read, and keys we know and deliberately ignore.
_NATIVE_KEYS = {
    "dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size",
    "rope_theta", "sliding_window", "moe", "max_seq_len", "max_position_embeddings",
}
_NATIVE_IGNORED = {"model_type", "max_batch_size", "lora", "use_biases", "bias", "_sliding_window", "torch_dtype"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Mistral or Mixtral transformer."""

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # The longest attention window when every layer has one, else None; it sizes the rotating KV cache.
    sliding_window: int | None = None
    # Per-layer windows (None: full attention) when layers differ (Ministral); empty: all use sliding_window.
    layer_windows: tuple[int | None, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    max_seq_len: int = 32768
    tie_embeddings: bool = False
    checkpoint_format: CheckpointFormat = "native"

    @property
    def architecture(self) -> str:
        return "mixtral" if self.num_experts else "mistral"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def attention_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: that layer attends to the whole context)."""
        return self.layer_windows or (self.sliding_window,) * self.n_layers

    def parameter_count(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        if self.is_moe:
            ffn = ffn * self.num_experts + self.dim * self.num_experts
        per_layer = attn + ffn + 2 * self.dim
        out = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + out + self.dim

    def with_(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)


def detect_format(model_dir: Path) -> CheckpointFormat:
    """`native` when the folder has params.json, `hf` when it has config.json."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelFilesError(f"model directory {model_dir} does not exist: check the path or run `mistral-chat pull`")
    if not model_dir.is_dir():
        raise ModelFilesError(f"{model_dir} is a file, not a model directory: pass the folder that holds it")
    if (model_dir / "params.json").exists():
        return "native"
    if (model_dir / "config.json").exists():
        return "hf"
    raise ModelFilesError(
        f"{model_dir} has neither params.json (native format) nor config.json (Hugging Face format): "
        "point --model at a Mistral model folder"
    )


def load_config(model_dir: Path) -> ModelConfig:
    """Read the model's shape from whichever config file the folder holds."""
    model_dir = Path(model_dir)
    fmt = detect_format(model_dir)
    if fmt == "native":
        return parse_params(_read_json(model_dir / "params.json"), source=str(model_dir / "params.json"))
    return parse_hf_config(_read_json(model_dir / "config.json"), source=str(model_dir / "config.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"{path} is not valid JSON ({exc}): re-download the model") from exc
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path} should hold a JSON object: re-download the model")
    return data


def _need(data: dict[str, Any], key: str, source: str) -> Any:
    if key not in data or data[key] is None:
        raise ModelFilesError(f"{source} lacks '{key}': the file is incomplete, re-download the model")
    return data[key]


def _window(value: Any, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelFilesError(f"{source}: sliding_window must be a positive integer or null, got {value!r}")
    return value


def _layer_windows(value: Any, n_layers: int, source: str) -> tuple[int | None, tuple[int | None, ...]]:
    """(sliding_window, layer_windows) from a params.json sliding_window: null, an int, or a list.

    A list is mistral-inference's per-layer pattern (Ministral-8B): it repeats over the layers, so its length
    must divide n_layers; a null entry is a full-attention layer.
    """
    if not isinstance(value, list):
        return _window(value, source), ()
    if not value or n_layers % len(value):
        raise ModelFilesError(f"{source}: sliding_window lists {len(value)} windows, which does not divide "
                              f"n_layers={n_layers}: give one window per layer or a repeating pattern")
    pattern = tuple(_window(v, source) for v in value)
    return _combine_windows(pattern * (n_layers // len(pattern)))


def _combine_windows(windows: tuple[int | None, ...]) -> tuple[int | None, tuple[int | None, ...]]:
    if len(set(windows)) == 1:  # the same window everywhere: the plain single-window model
        return windows[0], ()
    longest = None if None in windows else max(w for w in windows if w is not None)
    return longest, windows


def parse_params(data: dict[str, Any], source: str = "params.json") -> ModelConfig:
    """Native (mistral-inference) params.json."""
    unknown = set(data) - _NATIVE_KEYS - _NATIVE_IGNORED
    if unknown:
        log.warning("%s: ignoring unknown keys %s", source, ", ".join(sorted(unknown)))
    dim = int(_need(data, "dim", source))
    n_heads = int(_need(data, "n_heads", source))
    n_layers = int(_need(data, "n_layers", source))
    window, layer_windows = _layer_windows(data.get("sliding_window"), n_layers, source)
    moe = data.get("moe") or {}
    rope_theta = data.get("rope_theta")
    if rope_theta is None:  # mistral-inference's default: 10000 with a window (7B v0.1), 1e6 otherwise
        windowed = window is not None or any(w is not None for w in layer_windows)
        rope_theta = 10000.0 if windowed else 1_000_000.0
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        head_dim=int(data.get("head_dim") or dim // n_heads),
        hidden_dim=int(_need(data, "hidden_dim", source)),
        n_heads=n_heads,
        n_kv_heads=int(data.get("n_kv_heads") or n_heads),
        vocab_size=int(_need(data, "vocab_size", source)),
        norm_eps=float(data.get("norm_eps", 1e-5)),
        rope_theta=float(rope_theta),
        sliding_window=window,
        layer_windows=layer_windows,
        num_experts=int(moe.get("num_experts", 0)),
        num_experts_per_tok=int(moe.get("num_experts_per_tok", 0)),
        max_seq_len=int(data.get("max_seq_len") or data.get("max_position_embeddings") or 32768),
        checkpoint_format="native",
    )


def parse_hf_config(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """transformers' config.json for model_type mistral, mixtral or ministral (per-layer `layer_types`)."""
    model_type = data.get("model_type")
    if model_type not in ("mistral", "mixtral", "ministral"):
        raise ModelFilesError(f"{source}: model_type {model_type!r} is not supported; mistral-chat runs "
                              "'mistral', 'mixtral' and 'ministral' models")
    dim = int(_need(data, "hidden_size", source))
    n_heads = int(_need(data, "num_attention_heads", source))
    rope = data.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
    experts = int(data.get("num_local_experts", 0)) if model_type == "mixtral" else 0
    n_layers = int(_need(data, "num_hidden_layers", source))
    window = _window(data.get("sliding_window"), source)
    if data.get("use_sliding_window") is False:
        window = None
    window, layer_windows = _hf_layer_windows(data.get("layer_types"), window, n_layers, source)
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        head_dim=int(data.get("head_dim") or dim // n_heads),
        hidden_dim=int(_need(data, "intermediate_size", source)),
        n_heads=n_heads,
        n_kv_heads=int(data.get("num_key_value_heads") or n_heads),
        vocab_size=int(_need(data, "vocab_size", source)),
        norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        sliding_window=window,
        layer_windows=layer_windows,
        num_experts=experts,
        num_experts_per_tok=int(data.get("num_experts_per_tok", 0)) if experts else 0,
        max_seq_len=int(data.get("max_position_embeddings") or 32768),
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        checkpoint_format="hf",
    )


def _hf_layer_windows(layer_types: Any, window: int | None, n_layers: int, source: str
                      ) -> tuple[int | None, tuple[int | None, ...]]:
    """transformers' `layer_types` (Ministral): each layer "sliding_attention" (the window) or "full_attention"."""
    if layer_types is None or window is None:
        return window, ()
    kinds = {"sliding_attention": window, "full_attention": None}
    if not isinstance(layer_types, list) or len(layer_types) != n_layers or any(t not in kinds for t in layer_types):
        raise ModelFilesError(f"{source}: layer_types must list 'sliding_attention' or 'full_attention' for each of "
                              f"the {n_layers} layers: re-download the model")
    return _combine_windows(tuple(kinds[t] for t in layer_types))
