"""Per-layer sliding windows (Ministral-8B's `"sliding_window": [...]` in params.json, transformers' `layer_types`).

References: transformers' MinistralForCausalLM (sliding and full-attention layers mixed), and the same HF model
run on the whole sequence with an explicit mask per layer for windows that differ from layer to layer (HF's
Ministral has one window size, so that case has no ready-made HF model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_chat.engine.config import load_config, parse_hf_config, parse_params
from mistral_chat.engine.loader import load_model
from mistral_chat.errors import ModelFilesError
from tiny_models import TinySpec, copy_tokenizer, hf_to_native, native_params

PARAMS = dict(dim=64, n_layers=4, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=32768)


def test_params_window_lists():
    # one window per layer, or a pattern repeated over the layers (mistral-inference's rule); null = full
    c = parse_params({**PARAMS, "sliding_window": [None, 8]})
    assert c.attention_windows == (None, 8, None, 8) and c.sliding_window is None
    c = parse_params({**PARAMS, "sliding_window": [4, 8, 16, 8]})
    assert c.attention_windows == (4, 8, 16, 8) and c.sliding_window == 16
    c = parse_params({**PARAMS, "sliding_window": [32, 32]})  # uniform: the plain single-window model
    assert c.layer_windows == () and c.sliding_window == 32 and c.attention_windows == (32,) * 4
    c = parse_params({**PARAMS, "sliding_window": 16})
    assert c.attention_windows == (16,) * 4
    assert parse_params({**PARAMS, "sliding_window": [None, 8]}).rope_theta == 10000.0
    with pytest.raises(ModelFilesError, match="3 windows.*n_layers=4"):
        parse_params({**PARAMS, "sliding_window": [4, 8, 16]}, source="x/params.json")
    with pytest.raises(ModelFilesError, match="positive integer"):
        parse_params({**PARAMS, "sliding_window": [4, 0]})


def test_hf_layer_types():
    hf = dict(model_type="ministral", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=32768, sliding_window=8)
    c = parse_hf_config({**hf, "layer_types": ["full_attention", "sliding_attention"] * 2})
    assert c.attention_windows == (None, 8, None, 8)
    assert parse_hf_config(hf).attention_windows == (8,) * 4
    with pytest.raises(ModelFilesError, match="layer_types"):
        parse_hf_config({**hf, "layer_types": ["full_attention"]})


def write_ministral(root: Path, windows: list[int | None], seed: int = 0) -> dict[str, Path]:
    """An HF Ministral checkpoint (hf/) and the same weights natively (native/, per-layer window list)."""
    from transformers import MinistralConfig, MinistralForCausalLM

    spec = TinySpec(n_layers=len(windows), sliding_window=None, seed=seed)
    given = [w for w in windows if w is not None]
    window = max(given)
    config = MinistralConfig(
        vocab_size=32768, hidden_size=spec.dim, intermediate_size=spec.hidden_dim, num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads, head_dim=spec.dim // spec.n_heads,
        max_position_embeddings=spec.max_seq_len, rms_norm_eps=1e-5, sliding_window=window,
        layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta}, initializer_range=spec.init_std,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = MinistralForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    hf_dir, native_dir = root / "hf", root / "native"
    model.float().save_pretrained(hf_dir)
    copy_tokenizer(hf_dir, spec.tokenizer)
    native_dir.mkdir(parents=True)
    save_file(hf_to_native(load_file(hf_dir / "model.safetensors"), spec), native_dir / "consolidated.safetensors")
    (native_dir / "params.json").write_text(json.dumps({**native_params(spec), "sliding_window": windows}))
    copy_tokenizer(native_dir, spec.tokenizer)
    return {"hf": hf_dir, "native": native_dir}


@pytest.fixture(scope="module")
def ministral(tmp_path_factory) -> dict[str, Path]:
    return write_ministral(tmp_path_factory.mktemp("ministral"), [8, None, 8, None])


@pytest.fixture(scope="module")
def three_windows(tmp_path_factory) -> dict[str, Path]:
    return write_ministral(tmp_path_factory.mktemp("windows"), [4, 12, 8], seed=1)


def hf_reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 32000, (1, n), generator=torch.Generator().manual_seed(seed))


def engine_steps(path: Path, ids: torch.Tensor, prefill: int, chunk: int, steps: int, capacity: int = 128):
    """Logits of a chunked prefill of ids[:, :prefill], then of each later token fed one at a time
    (teacher-forced from ids), then `steps` greedy tokens."""
    model = load_model(path, device="cpu", dtype="float32").model
    model.setup_cache(capacity, prefill_chunk=chunk)
    rows, pos = [], 0
    with torch.no_grad():
        while pos < prefill:
            part = ids[:, pos:min(pos + chunk, prefill)]
            rows.append(model(part, pos, all_logits=True)[0])
            pos += part.shape[1]
        for p in range(prefill, ids.shape[1]):
            rows.append(model(ids[:, p:p + 1], p)[0])
        logits, greedy = rows[-1], []
        for p in range(ids.shape[1], ids.shape[1] + steps):
            greedy.append(int(logits[-1].argmax()))
            logits = model(torch.tensor([[greedy[-1]]]), p)[0]
    return model, torch.cat(rows), greedy


def hf_greedy(model, ids: torch.Tensor, steps: int, **kw) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             attention_mask=torch.ones_like(ids), **kw)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_mixed_sliding_and_full_layers_match_hf_ministral(ministral, fmt):
    assert load_config(ministral[fmt]).attention_windows == (8, None, 8, None)
    ids = prompt(48)
    hf = hf_reference(ministral["hf"])
    with torch.no_grad():
        expected = hf(ids).logits[0]
    model, got, greedy = engine_steps(ministral[fmt], ids, prefill=40, chunk=16, steps=16)
    assert model.cache_capacity == 128  # a full-attention layer: the cache holds everything, no wrap
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert greedy == hf_greedy(hf, ids, 16)


def explicit_mask_logits(hf, windows: list[int | None], ids: torch.Tensor) -> torch.Tensor:
    """HF's forward over the whole sequence, each layer masked to its own window."""
    t = ids.shape[1]
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    masks = {}
    for w in set(windows):
        allowed = (k <= q) & ((q - k < w) if w is not None else True)
        masks[f"window-{w}"] = torch.zeros(t, t).masked_fill(~allowed, float("-inf"))[None, None]
    hf.config.layer_types = [f"window-{w}" for w in windows]  # each layer looks up its own mask by this name
    with torch.no_grad():
        return hf(ids, attention_mask=masks, use_cache=False).logits[0]


def test_distinct_windows_per_layer_match_explicit_masks(three_windows):
    """Windows 4, 12, 8: the cache wraps (capacity 12 + chunk - 1) and each layer masks with its own window."""
    windows = [4, 12, 8]
    ids = prompt(60, seed=2)
    hf = hf_reference(three_windows["hf"])
    with torch.no_grad():
        single = hf(ids).logits[0]  # HF's own Ministral gives every sliding layer the window 12
    expected = explicit_mask_logits(hf, windows, ids)
    assert (single - expected).abs().max() > 1e-3  # so the per-layer masks matter here
    model, got, greedy = engine_steps(three_windows["native"], ids, prefill=20, chunk=6, steps=8, capacity=256)
    assert model.cache_capacity == 12 + 6 - 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    seq = ids  # greedy reference: the whole sequence again, with the explicit masks, for every new token
    for _ in range(8):
        seq = torch.cat([seq, explicit_mask_logits(hf, windows, seq)[-1].argmax().view(1, 1)], dim=1)
    assert greedy == seq[0, 60:].tolist()
