"""How much memory a model will take (weights + KV cache), checked against the device before loading."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mistral_chat.engine.cache import cache_capacity
from mistral_chat.engine.config import ModelConfig
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
    """Weights and KV cache of one rank of a model loaded as `dtype` (int8 projections with `quantize`)."""
    item = torch.finfo(dtype).bits // 8
    c = config
    projections = c.n_layers * c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    ffn = 3 * c.dim * c.hidden_dim * max(1, c.num_experts)
    projections += c.n_layers * ffn + c.vocab_size * c.dim  # + the output layer
    other = c.vocab_size * c.dim // world + c.n_layers * (2 * c.dim + c.dim * c.num_experts) + c.dim
    if quantize == "int8":
        rows = c.n_layers * (c.head_dim * (c.n_heads + 2 * c.n_kv_heads) + c.dim
                             + max(1, c.num_experts) * (2 * c.hidden_dim + c.dim)) + c.vocab_size
        weights = projections // world + rows * item // world + other * item
    else:
        weights = projections * item // world + other * item
    kv_heads = max(1, c.n_kv_heads // world)
    slots, _ = cache_capacity(context, c.sliding_window, prefill_chunk)
    kv = 2 * c.n_layers * batch * kv_heads * c.head_dim * slots * item
    return MemoryEstimate(weights=weights, kv_cache=kv)


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
        advice.append("--quantize int8 (about half the weights)")
    if device.type == "cuda":
        advice.append(f"--tp {world * 2} over more GPUs")
    if estimate.kv_cache > 0.1 * estimate.total and context > 4096:
        advice.append(f"a shorter --context (now {context})")
    advice.append("a smaller model")
    raise DeviceError(
        f"{model_name} needs about {estimate.total / GB:.1f} GB on {device} (weights {estimate.weights / GB:.1f} GB "
        f"+ KV cache {estimate.kv_cache / GB:.1f} GB) but {free / GB:.1f} GB are free: try " + ", ".join(advice))
