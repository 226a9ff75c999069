"""Real model shapes the benchmark builds random weights of (no torch: the command line lists them)."""

from __future__ import annotations

from mistral_chat.engine.config import ModelConfig

SHAPES: dict[str, ModelConfig] = {
    "mistral-7b": ModelConfig(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                              vocab_size=32768, rope_theta=1e6, max_seq_len=32768),
    "mistral-7b-v0.1": ModelConfig(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                   vocab_size=32000, sliding_window=4096, max_seq_len=32768),
    "mixtral-8x7b": ModelConfig(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                vocab_size=32000, rope_theta=1e6, num_experts=8, num_experts_per_tok=2),
    "mixtral-8x22b": ModelConfig(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
                                 vocab_size=32768, rope_theta=1e6, num_experts=8, num_experts_per_tok=2,
                                 max_seq_len=65536),
    "nemo-12b": ModelConfig(dim=5120, n_layers=40, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                            vocab_size=131072, rope_theta=1e6, max_seq_len=131072),
    "small-22b": ModelConfig(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
                             vocab_size=32768, rope_theta=1e6),
    "tiny": ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=512,
                        sliding_window=64, max_seq_len=4096),
}


def bench_shape(shape: str, layers: int | None = None, window: int | None = None) -> ModelConfig:
    """A named real shape, optionally cut to `layers` layers or given another sliding window."""
    config = SHAPES[shape]
    if layers:
        config = config.with_(n_layers=layers)
    if window:
        config = config.with_(sliding_window=window)
    return config
