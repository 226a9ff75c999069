"""Model hyper-parameters, read from a native `params.json` or a Hugging Face `config.json`."""

from __future__ import annotations

import json
import logging
import math
import os
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
    # "awq": the projections are stored 4-bit by AutoAWQ (config.json's quantization_config; awq.py loads them)
    quantization: str | None = None

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
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise ModelFilesError(f"cannot read the model folder {model_dir} (permission denied): give your user read "
                              f"access to it (chmod u+rx, or chmod -R u+rX for its files)")
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
    data = _read_json(model_dir / "config.json")
    if "quantization_config" not in data and (model_dir / "quantize_config.json").exists():
        data["quantization_config"] = _read_json(model_dir / "quantize_config.json")  # older GPTQ/AWQ repos
        data["quantization_config"].setdefault("quant_method", "gptq")
    return parse_hf_config(data, source=str(model_dir / "config.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise ModelFilesError(f"cannot read {path} (permission denied): give your user read access to it "
                              "(chmod u+r)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"{path} is not valid JSON ({exc}): re-download the model") from exc
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path} should hold a JSON object: re-download the model")
    return data


def _need(data: dict[str, Any], key: str, source: str) -> Any:
    if key not in data or data[key] is None:
        raise ModelFilesError(f"{source} lacks '{key}': the file is incomplete, re-download the model")
    return data[key]


def _bad(source: str, key: str, expected: str, value: Any) -> ModelFilesError:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return ModelFilesError(f"{source}: '{key}' must be {expected}, got {shown}: fix the file or re-download the model")


def _int(data: dict[str, Any], key: str, source: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer >= `minimum` (64.0 is 64; 64.7, "64", true are refused); `default` when absent or null, else
    the key is required."""
    value = data.get(key)
    if value is None:
        if default is None:
            return int(_need(data, key, source))
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(source, key, expected, value)
    return value


def _positive_float(data: dict[str, Any], key: str, source: str, default: float) -> float:
    """A finite number > 0; `default` when absent or null."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad(source, key, "a positive number", value)
    return float(value)


def _heads(dim: int, n_heads: int, n_kv_heads: int, head_dim: int | None, keys: tuple[str, str, str, str],
           source: str) -> int:
    """head_dim (given, or dim / n_heads), after checking that the heads divide as attention needs."""
    dim_key, heads_key, kv_key, head_dim_key = keys
    if n_heads % n_kv_heads:
        raise ModelFilesError(f"{source}: '{heads_key}' ({n_heads}) must be a multiple of '{kv_key}' ({n_kv_heads}): "
                              "fix the file or re-download the model")
    if head_dim is None:
        if dim % n_heads:
            raise ModelFilesError(f"{source}: '{dim_key}' ({dim}) is not divisible by '{heads_key}' ({n_heads}) and "
                                  f"'{head_dim_key}' is not given: fix the file or re-download the model")
        return dim // n_heads
    return head_dim


def _moe(data: dict[str, Any], source: str) -> tuple[int, int]:
    """(num_experts, num_experts_per_tok) of params.json's optional `moe` object; (0, 0) without one."""
    moe = data.get("moe")
    if moe is None:
        return 0, 0
    if not isinstance(moe, dict):
        raise _bad(source, "moe", "an object {num_experts, num_experts_per_tok}", moe)
    experts = _int(moe, "num_experts", f"{source} moe")
    per_token = _int(moe, "num_experts_per_tok", f"{source} moe")
    if per_token > experts:
        raise ModelFilesError(f"{source}: moe 'num_experts_per_tok' ({per_token}) is more than 'num_experts' "
                              f"({experts}): fix the file or re-download the model")
    return experts, per_token


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
    """Native (mistral-inference) params.json. Every size is checked (type and range) and named when wrong."""
    unknown = set(data) - _NATIVE_KEYS - _NATIVE_IGNORED
    if unknown:
        log.warning("%s: ignoring unknown keys %s", source, ", ".join(sorted(unknown)))
    dim = _int(data, "dim", source)
    n_heads = _int(data, "n_heads", source)
    n_layers = _int(data, "n_layers", source)
    n_kv_heads = _int(data, "n_kv_heads", source, default=n_heads)
    head_dim = _heads(dim, n_heads, n_kv_heads, _int(data, "head_dim", source, default=0, minimum=1) or None,
                      ("dim", "n_heads", "n_kv_heads", "head_dim"), source)
    window, layer_windows = _layer_windows(data.get("sliding_window"), n_layers, source)
    experts, per_token = _moe(data, source)
    windowed = window is not None or any(w is not None for w in layer_windows)
    # mistral-inference's default rope_theta: 10000 with a window (7B v0.1), 1e6 otherwise
    rope_theta = _positive_float(data, "rope_theta", source, 10000.0 if windowed else 1_000_000.0)
    max_seq_len = _int(data, "max_seq_len", source, default=0) or _int(data, "max_position_embeddings", source,
                                                                      default=32768)
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        head_dim=head_dim,
        hidden_dim=_int(data, "hidden_dim", source),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=_int(data, "vocab_size", source),
        norm_eps=_positive_float(data, "norm_eps", source, 1e-5),
        rope_theta=rope_theta,
        sliding_window=window,
        layer_windows=layer_windows,
        num_experts=experts,
        num_experts_per_tok=per_token,
        max_seq_len=max_seq_len,
        checkpoint_format="native",
    )


def parse_hf_config(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """transformers' config.json for model_type mistral, mixtral or ministral (per-layer `layer_types`)."""
    model_type = data.get("model_type")
    if model_type not in ("mistral", "mixtral", "ministral"):
        raise ModelFilesError(f"{source}: model_type {model_type!r} is not supported; mistral-chat runs "
                              "'mistral', 'mixtral' and 'ministral' models")
    dim = _int(data, "hidden_size", source)
    n_heads = _int(data, "num_attention_heads", source)
    n_kv_heads = _int(data, "num_key_value_heads", source, default=n_heads)
    head_dim = _heads(dim, n_heads, n_kv_heads, _int(data, "head_dim", source, default=0) or None,
                      ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"), source)
    rope = data.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise _bad(source, "rope_parameters", "an object", rope)
    rope_theta = _positive_float(rope, "rope_theta", f"{source} rope_parameters",
                                 _positive_float(data, "rope_theta", source, 10000.0))
    experts = _int(data, "num_local_experts", source, default=0, minimum=0) if model_type == "mixtral" else 0
    per_token = _int(data, "num_experts_per_tok", source, default=0, minimum=0) if experts else 0
    if experts and not 1 <= per_token <= experts:
        raise ModelFilesError(f"{source}: 'num_experts_per_tok' ({per_token}) must be between 1 and "
                              f"'num_local_experts' ({experts}): fix the file or re-download the model")
    n_layers = _int(data, "num_hidden_layers", source)
    window = _window(data.get("sliding_window"), source)
    if data.get("use_sliding_window") is False:
        window = None
    window, layer_windows = _hf_layer_windows(data.get("layer_types"), window, n_layers, source)
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        head_dim=head_dim,
        hidden_dim=_int(data, "intermediate_size", source),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=_int(data, "vocab_size", source),
        norm_eps=_positive_float(data, "rms_norm_eps", source, 1e-6),
        rope_theta=rope_theta,
        sliding_window=window,
        layer_windows=layer_windows,
        num_experts=experts,
        num_experts_per_tok=per_token,
        max_seq_len=_int(data, "max_position_embeddings", source, default=32768),
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        checkpoint_format="hf",
        quantization=_quantization(data.get("quantization_config"), source),
    )


def _quantization(value: Any, source: str) -> str | None:
    """"awq" for AutoAWQ's 4-bit GEMM checkpoints (group 128, zero point), None for unquantized ones; any other
    quantization a one-line ModelFilesError."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(source, "quantization_config", "an object", value)
    method = str(value.get("quant_method") or "unknown").lower()
    if method != "awq":
        raise ModelFilesError(f"{source}: the weights are quantized with {method.upper()}, which mistral-chat does "
                              "not load: use the model's bf16 release (with --quantize int4 or int8) or a 4-bit "
                              "AWQ one")
    found = {"bits": value.get("bits", value.get("w_bit")),
             "group_size": value.get("group_size", value.get("q_group_size")),
             "zero_point": value.get("zero_point", True), "version": str(value.get("version", "gemm")).lower()}
    wanted = {"bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    bad = [f"{key} {found[key]}" for key in wanted if found[key] != wanted[key]]
    if bad:
        raise ModelFilesError(f"{source}: AWQ with {', '.join(bad)} is not supported (mistral-chat loads AWQ "
                              "GEMM checkpoints of 4 bits, group_size 128, zero_point true): use the model's bf16 "
                              "release or such an AWQ one")
    return "awq"


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
