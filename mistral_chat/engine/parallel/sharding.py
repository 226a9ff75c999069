"""Which slice of the model a tensor-parallel rank holds (Megatron style).

- attention: q/k/v column-parallel by heads, `wo` row-parallel;
- feed-forward and each MoE expert: w1/w3 column-parallel, w2 row-parallel (on the hidden dim);
- embedding and output: split by vocabulary rows (the embedding lookup is summed, the logits gathered).

KV heads are split when the world divides them; otherwise the world must be a multiple of them and each KV head is
replicated on the world / n_kv_heads ranks whose query heads use it (see `check_tensor_parallel`). weights.py reads
each rank's slice; collectives.py sums and gathers the partial results. With one process everything is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from mistral_chat.errors import MistralChatError


@dataclass(frozen=True)
class Parallel:
    """This process's place in a tensor-parallel group."""

    rank: int = 0
    world: int = 1
    group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def local_kv_heads(self, n_kv_heads: int) -> int:
        """KV heads held here: split when the world divides them, else each rank keeps the copies it needs."""
        if n_kv_heads % self.world == 0:
            return n_kv_heads // self.world
        return 1  # the world is a multiple of n_kv_heads: this rank's query heads share one KV head

    @property
    def process_group(self) -> Any:
        return self.group if self.group is not None else dist.group.WORLD


def check_tensor_parallel(world: int, n_heads: int, n_kv_heads: int, hidden_dim: int, vocab_size: int) -> None:
    """MistralChatError unless a model of these sizes can be split over `world` ranks.

    The world must divide the attention heads, hidden units and vocabulary; and either divide the KV heads
    (each rank holds n_kv_heads / world of them) or be a multiple of them (each KV head is replicated on
    world / n_kv_heads ranks, so that no rank's query heads straddle two KV groups).
    """
    if world < 1:
        raise MistralChatError(f"--tp {world} is not a process count: use --tp 1 or more")
    for what, size in (("attention heads", n_heads), ("hidden units", hidden_dim),
                       ("vocabulary entries", vocab_size)):
        if size % world:
            raise MistralChatError(f"--tp {world} does not divide the model's {size} {what}: "
                                   "choose a --tp that does")
    if n_kv_heads % world and world % n_kv_heads:
        raise MistralChatError(f"--tp {world} neither divides nor is a multiple of the model's {n_kv_heads} "
                               "KV heads: choose a --tp that is")
