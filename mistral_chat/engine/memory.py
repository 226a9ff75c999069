"""How much memory a model will take (weights + KV cache), checked against the device before loading."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mistral_chat.engine.cache import cache_capacity
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.int4 import group_size
from mistral_chat.errors import DeviceError

GB = 1e9
DEFAULT_CONTEXT = 32768  # context when neither the user nor a smaller model limit says otherwise


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs."""

    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def session_context(config: ModelConfig, requested: int | None) -> int:
    """The context a session gets: what was asked for (default DEFAULT_CONTEXT), never more than the model's."""
    return min(requested or min(config.max_seq_len, DEFAULT_CONTEXT), config.max_seq_len)


def estimate_memory(config: ModelConfig, dtype: torch.dtype, context: int, prefill_chunk: int = 2048,
                    quantize: str | None = None, world: int = 1, batch: int = 1) -> MemoryEstimate:
    """Weights and KV cache of one rank of a model loaded as `dtype` (int8 or int4 projections with `quantize`;
    an AWQ checkpoint's are int4 whatever `quantize` says, its output projection in `dtype`)."""
    item = torch.finfo(dtype).bits // 8
    c = config
    awq = c.quantization == "awq"
    if awq:
        quantize = "int4"
    experts = max(1, c.num_experts)
    heads, kv_heads, hidden = c.n_heads // world, max(1, c.n_kv_heads // world), c.hidden_dim // world
    # each projection of one rank: (outputs, inputs, how many)
    output = (c.vocab_size // world, c.dim, 1)
    shapes = [(c.head_dim * (heads + 2 * kv_heads), c.dim, c.n_layers), (c.dim, heads * c.head_dim, c.n_layers),
              output]
    # the feed-forward's w13 and w2 (Mixtral's experts: int4 only if groups divide both sizes, as moe.py)
    ffn_int4 = not c.is_moe or (group_size(c.dim) is not None and group_size(hidden) is not None)
    ffn = [(2 * hidden, c.dim, c.n_layers * experts), (c.dim, hidden, c.n_layers * experts)]
    other = c.vocab_size * c.dim // world + c.n_layers * (2 * c.dim + c.dim * c.num_experts) + c.dim
    weights = other * item
    for shape in shapes + ffn:
        n, k, count = shape
        mode = None if awq and shape is output else quantize  # AWQ keeps the output projection unquantized
        if mode == "int4" and (group_size(k) is None or ((n, k, count) in ffn and not ffn_int4)):
            mode = "int8"
        weights += count * _projection_bytes(n, k, mode, item)
    slots, _ = cache_capacity(context, c.sliding_window, prefill_chunk)
    kv = 2 * c.n_layers * batch * kv_heads * c.head_dim * slots * item
    return MemoryEstimate(weights=weights, kv_cache=kv)


def _projection_bytes(n: int, k: int, quantize: str | None, item: int) -> int:
    """Bytes of an [n, k] projection: float, int8 with a scale a row, or int4 (two a byte) with a scale and a low
    value per group of each row."""
    if quantize == "int8":
        return n * k + n * item
    if quantize == "int4":
        return n * k // 2 + 2 * n * (k // (group_size(k) or k)) * item
    return n * k * item


def free_memory(device: torch.device) -> int:
    """Bytes free on a GPU, or available host memory for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def check_fits(estimate: MemoryEstimate, free: int, device: torch.device, model_name: str,
               quantize: str | None, world: int, context: int) -> None:
    """DeviceError with advice when the estimate exceeds what is free."""
    if estimate.total <= free:
        return
    advice = []
    if quantize is None:
        advice.append("--quantize int8 (about half the weights) or int4 (about a quarter)")
    elif quantize == "int8":
        advice.append("--quantize int4 (about half the int8 weights)")
    if device.type == "cuda":
        advice.append(f"--tp {world * 2} over more GPUs")
    if estimate.kv_cache > 0.1 * estimate.total and context > 4096:
        advice.append(f"a shorter --context (now {context})")
    advice.append("a smaller model")
    raise DeviceError(
        f"{model_name} needs about {estimate.total / GB:.1f} GB on {device} (weights {estimate.weights / GB:.1f} GB "
        f"+ KV cache {estimate.kv_cache / GB:.1f} GB) but {free / GB:.1f} GB are free: try " + ", ".join(advice))
