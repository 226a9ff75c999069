"""A random checkpoint of a real model shape on disk, in the native layout (params.json, safetensors shards, and a
synthetic tekken.json whose vocabulary covers every id the model can produce): what `bench --tp` and the GPU
harnesses load, as `mistral-chat --model DIR` would, with no download."""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mistral_chat.engine.config import ModelConfig
from mistral_chat.errors import MistralChatError
from mistral_chat.text.tekken_tokenizer import DEFAULT_SPECIAL_TOKENS

TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_NUM_SPECIAL = 1000  # what Mistral's tekken files reserve
SHARD_BYTES = 4 << 30


def special_count(vocab_size: int) -> int:
    """Special ids of the synthetic tokenizer: tekken's 1000 where the vocabulary is large, else the 20 defaults."""
    if vocab_size >= 2 * TEKKEN_NUM_SPECIAL + 256:
        return TEKKEN_NUM_SPECIAL
    if vocab_size < len(DEFAULT_SPECIAL_TOKENS) + 256:
        raise ValueError(f"a tekken vocabulary needs at least {len(DEFAULT_SPECIAL_TOKENS) + 256} tokens, "
                         f"got {vocab_size}")
    return len(DEFAULT_SPECIAL_TOKENS)


def synthetic_tekken(vocab_size: int, seed: int = 0) -> dict[str, Any]:
    """A valid tekken.json document of exactly `vocab_size` ids: special tokens, the 256 single bytes, then unique
    random lowercase words (some with a leading space), so any id decodes to readable text."""
    num_special = special_count(vocab_size)
    inner = vocab_size - num_special
    rng = random.Random(seed)
    tokens: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    while len(tokens) < inner:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8)))
        token = (" " + word if rng.random() < 0.5 else word).encode()
        if token not in seen:
            seen.add(token)
            tokens.append(token)

    def entry(rank: int, token: bytes) -> dict[str, Any]:
        try:
            text: str | None = token.decode()
        except UnicodeDecodeError:
            text = None
        return {"rank": rank, "token_bytes": base64.b64encode(token).decode(), "token_str": text}

    return {
        "config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": inner, "default_vocab_size": vocab_size,
                   "default_num_special_tokens": num_special, "version": "v7"},
        "vocab": [entry(rank, token) for rank, token in enumerate(tokens)],
        "special_tokens": [{"rank": rank, "token_str": name, "is_control": True}
                           for rank, name in enumerate(DEFAULT_SPECIAL_TOKENS)],
    }


def native_params(config: ModelConfig) -> dict[str, Any]:
    """params.json for `config` (mistral-inference's keys)."""
    params: dict[str, Any] = {
        "dim": config.dim, "n_layers": config.n_layers, "head_dim": config.head_dim,
        "hidden_dim": config.hidden_dim, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
        "norm_eps": config.norm_eps, "vocab_size": config.vocab_size, "rope_theta": config.rope_theta,
        "max_seq_len": config.max_seq_len,
    }
    if config.layer_windows:
        params["sliding_window"] = list(config.layer_windows)
    elif config.sliding_window is not None:
        params["sliding_window"] = config.sliding_window
    if config.is_moe:
        params["moe"] = {"num_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok}
    return params


def native_tensors(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a native checkpoint of `config`, in file order."""
    c = config
    yield "tok_embeddings.weight", (c.vocab_size, c.dim)
    yield "norm.weight", (c.dim,)
    yield "output.weight", (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"layers.{i}"
        yield f"{p}.attention_norm.weight", (c.dim,)
        yield f"{p}.ffn_norm.weight", (c.dim,)
        yield f"{p}.attention.wq.weight", (c.n_heads * c.head_dim, c.dim)
        yield f"{p}.attention.wk.weight", (c.n_kv_heads * c.head_dim, c.dim)
        yield f"{p}.attention.wv.weight", (c.n_kv_heads * c.head_dim, c.dim)
        yield f"{p}.attention.wo.weight", (c.dim, c.n_heads * c.head_dim)
        experts = [f"{p}.feed_forward.experts.{e}" for e in range(c.num_experts)] if c.is_moe \
            else [f"{p}.feed_forward"]
        if c.is_moe:
            yield f"{p}.feed_forward.gate.weight", (c.num_experts, c.dim)
        for ex in experts:
            yield f"{ex}.w1.weight", (c.hidden_dim, c.dim)
            yield f"{ex}.w2.weight", (c.dim, c.hidden_dim)
            yield f"{ex}.w3.weight", (c.hidden_dim, c.dim)


def write_random_checkpoint(folder: Path | str, config: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0, shard_bytes: int = SHARD_BYTES, device: str | torch.device = "cpu",
                            progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a native checkpoint of `config` with random weights (std 0.02, norms 1) to `folder`.

    Tensors are made one at a time (on `device`, then moved to the host) and written shard by shard, so host
    memory holds at most one shard: one `consolidated.safetensors`, or `consolidated-0000i-of-0000n.safetensors`
    files and `consolidated.safetensors.index.json`. The output rows of the special token ids are zero (see the
    module's doc). Returns the folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tekken = synthetic_tekken(config.vocab_size, seed)
    num_special = tekken["config"]["default_num_special_tokens"]
    (folder / "tekken.json").write_text(json.dumps(tekken))
    (folder / "params.json").write_text(json.dumps(native_params(config), indent=2))
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    names = list(native_tensors(config))
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(folder / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(pending))
        pending, pending_bytes = {}, 0

    for done, (name, shape) in enumerate(names, 1):
        if "norm" in name:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, device=dev, generator=gen, dtype=torch.float32) * 0.02).to(dtype)
            if name == "output.weight":
                t[:num_special] = 0
            t = t.cpu()
        pending[name] = t
        pending_bytes += t.numel() * t.element_size()
        if pending_bytes >= shard_bytes:
            flush()
        if progress is not None:
            progress(done, len(names))
    flush()
    if len(shards) == 1:
        (folder / "part-00000.safetensors").rename(folder / "consolidated.safetensors")
        return folder
    weight_map = {}
    for i, tensors in enumerate(shards):
        final = f"consolidated-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{i:05d}.safetensors").rename(folder / final)
        weight_map.update({name: final for name in tensors})
    index = {"metadata": {"total_size": sum(config_bytes(config, dtype))}, "weight_map": weight_map}
    (folder / "consolidated.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def config_bytes(config: ModelConfig, dtype: torch.dtype) -> Iterator[int]:
    """Bytes of each tensor of the checkpoint, in file order."""
    item = torch.finfo(dtype).bits // 8
    for _, shape in native_tensors(config):
        n = 1
        for s in shape:
            n *= s
        yield n * item


def reusable(folder: Path, config: ModelConfig) -> bool:
    """A checkpoint already written there for this very shape (its params.json matches)."""
    try:
        return json.loads((folder / "params.json").read_text()) == native_params(config) and \
            (folder / "tekken.json").is_file() and any(folder.glob("consolidated*.safetensors"))
    except (OSError, ValueError):
        return False


def clear_checkpoint(folder: Path) -> None:
    """Remove an earlier random checkpoint (of another shape) from `folder`; refuse a folder holding other files."""
    if not folder.is_dir():
        return
    ours = [f for f in folder.iterdir() if f.name in ("params.json", "tekken.json") or ".safetensors" in f.name]
    others = [f.name for f in folder.iterdir() if f not in ours]
    if others:
        raise MistralChatError(f"--tp-checkpoint {folder} holds other files ({', '.join(sorted(others)[:3])}): "
                               "give an empty or new folder")
    for f in ours:
        f.unlink()
