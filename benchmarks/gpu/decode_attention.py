"""Manual GPU microbenchmark (not collected by pytest): a decode step's attention for Mistral-7B's heads (32 query
and 8 KV heads of 128, bf16, one new token), the Triton kernel of engine/decode_attention.py against
`grouped_attention` eager and compiled by inductor, at cache lengths from 256 to 32768 keys and batches 1 and 4.
Each timing replays one CUDA graph of 32 calls, each on another layer's cache, so K and V come from memory and
not from the L2 cache, as in decode. It also checks the kernel against grouped_attention in float32.

    python3 benchmarks/gpu/decode_attention.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
from mistral_chat.engine.kernels.decode_attention import decode_attention  # noqa: E402
from mistral_chat.engine.model import grouped_attention  # noqa: E402
from int8_gemv import graph_time  # noqa: E402  (the script's own folder is on the path)

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32
KEYS = (256, 512, 1024, 2048, 4096, 8192, 32768)


def layer_time(fn, layers: list) -> float:
    """Seconds per call of fn(*layer), replayed from one CUDA graph over every layer's inputs."""
    return graph_time(lambda i: fn(*layers[i]), len(layers), reps=len(layers), replays=10)


def inputs(batch: int, keys: int, dtype: torch.dtype = torch.bfloat16) -> list:
    """Per layer: q ([B, H, 1, D], transposed from [B, 1, H, D] as the model makes it), k and v (the first
    `keys` slots of a cache 64 slots longer) and an all-true mask."""
    device = torch.device("cuda")
    mask = torch.ones(1, keys + 64, dtype=torch.bool, device=device)[:, :keys]
    layers = []
    for _ in range(LAYERS):
        q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=device, dtype=dtype).transpose(1, 2)
        cache = torch.randn(2, batch, KV_HEADS, keys + 64, HEAD_DIM, device=device, dtype=dtype)
        layers.append((q, cache[0, :, :, :keys], cache[1, :, :, :keys], mask))
    return layers


def main() -> None:
    print(torch.cuda.get_device_name())
    for q, k, v, mask in inputs(2, 1000, torch.float32)[:1]:
        error = (decode_attention(q, k, v, mask) - grouped_attention(q, k, v, mask)).abs().max().item()
        assert error < 1e-4, f"the kernel is off by {error:.3g} in float32"
    torch._dynamo.config.recompile_limit = 64  # one graph per (batch, keys): more than the default 8
    torch._inductor.config.coordinate_descent_tuning = True  # as compiled decode sets it
    compiled = torch.compile(grouped_attention, dynamic=False)
    print(f"{'batch':>5} {'keys':>6} {'eager us':>9} {'inductor us':>12} {'kernel us':>10} {'kernel TB/s':>12}")
    for batch in (1, 4):
        for keys in KEYS:
            layers = inputs(batch, keys)
            times = [layer_time(fn, layers) for fn in (grouped_attention, compiled, decode_attention)]
            kv_bytes = 2 * batch * KV_HEADS * keys * HEAD_DIM * 2
            print(f"{batch:5} {keys:6} {times[0] * 1e6:9.1f} {times[1] * 1e6:12.1f} {times[2] * 1e6:10.1f} "
                  f"{kv_bytes / times[2] / 1e12:12.2f}")
            del layers
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
