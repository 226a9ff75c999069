"""Reading a model folder's shape and files: params.json / config.json variants, sharded native weights, and which
tokenizer file wins when a folder has several."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_chat.engine.config import load_config, parse_hf_config, parse_params
from mistral_chat.engine.loader import load_model
from mistral_chat.text.tokenizer import find_tokenizer_file, load_tokenizer
from tiny_models import copy_tokenizer, write_tiny_model

PARAMS = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
          "norm_eps": 1e-5, "vocab_size": 32768}
HF_CONFIG = {"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32768, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 4096}


# ---- config.json -----------------------------------------------------------------------------------------------


def test_hf_rope_theta_at_top_level_transformers_4():
    assert parse_hf_config({**HF_CONFIG, "rope_theta": 1e6}).rope_theta == 1e6


def test_hf_rope_theta_in_rope_parameters_transformers_5():
    config = parse_hf_config({**HF_CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 123456.0}})
    assert config.rope_theta == 123456.0


def test_hf_config_written_by_transformers_round_trips(tmp_path):
    """The config.json transformers itself writes (rope_parameters, sliding_window, head_dim)."""
    dirs = write_tiny_model(tmp_path, "nemo")
    config = load_config(dirs["hf"])
    assert (config.rope_theta, config.head_dim, config.sliding_window) == (1e6, 24, None)
    assert config == load_config(dirs["native"]).with_(checkpoint_format="hf")


@pytest.mark.parametrize("window, expected", [("absent", None), (None, None), (4096, 4096)])
def test_hf_sliding_window(window, expected):
    data = dict(HF_CONFIG) if window == "absent" else {**HF_CONFIG, "sliding_window": window}
    assert parse_hf_config(data).sliding_window == expected


def test_hf_use_sliding_window_false_disables_it():
    assert parse_hf_config({**HF_CONFIG, "sliding_window": 4096, "use_sliding_window": False}).sliding_window is None


def test_hf_explicit_head_dim():
    config = parse_hf_config({**HF_CONFIG, "head_dim": 24})  # Nemo: 5120 / 32 heads != 128
    assert config.head_dim == 24 != config.dim // config.n_heads
    assert parse_hf_config(HF_CONFIG).head_dim == 16
    assert parse_hf_config({**HF_CONFIG, "head_dim": None}).head_dim == 16


def test_hf_mixtral_experts():
    config = parse_hf_config({**HF_CONFIG, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2})
    assert (config.num_experts, config.num_experts_per_tok, config.architecture) == (8, 2, "mixtral")


# ---- params.json -----------------------------------------------------------------------------------------------


def test_params_rope_theta_default_depends_on_the_window():
    assert parse_params({**PARAMS, "sliding_window": 4096}).rope_theta == 10000.0  # Mistral-7B v0.1
    assert parse_params(PARAMS).rope_theta == 1e6  # Mixtral
    assert parse_params({**PARAMS, "sliding_window": None}).rope_theta == 1e6
    assert parse_params({**PARAMS, "rope_theta": 1e6, "sliding_window": 4096}).rope_theta == 1e6


@pytest.mark.parametrize("window, expected", [("absent", None), (None, None), (4096, 4096)])
def test_params_sliding_window(window, expected):
    data = dict(PARAMS) if window == "absent" else {**PARAMS, "sliding_window": window}
    assert parse_params(data).sliding_window == expected


def test_params_explicit_head_dim():
    assert parse_params({**PARAMS, "head_dim": 24}).head_dim == 24
    assert parse_params({k: v for k, v in PARAMS.items() if k != "head_dim"}).head_dim == 16


def test_params_moe():
    config = parse_params({**PARAMS, "moe": {"num_experts": 8, "num_experts_per_tok": 2}})
    assert config.is_moe and (config.num_experts, config.num_experts_per_tok) == (8, 2)


def test_unknown_params_keys_are_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="mistral_chat.engine.config"):
        parse_params({**PARAMS, "quantization": {"bits": 4}, "vision_encoder": {}}, source="/m/params.json")
    assert "/m/params.json" in caplog.text
    assert "quantization" in caplog.text and "vision_encoder" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mistral_chat.engine.config"):
        parse_params({**PARAMS, "max_batch_size": 1, "sliding_window": 4096})  # known keys: silent
    assert caplog.text == ""


# ---- sharded native weights ------------------------------------------------------------------------------------


def test_sharded_native_checkpoint_loads_with_the_same_logits(tmp_path):
    single = write_tiny_model(tmp_path / "tiny", "mistral")["native"]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in single.iterdir():
        if f.name != "consolidated.safetensors":
            shutil.copy(f, sharded / f.name)
    state = load_file(single / "consolidated.safetensors")
    names = sorted(state)
    halves = {"consolidated-00001-of-00002.safetensors": names[::2],
              "consolidated-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, sharded / file)
        weight_map.update({n: file for n in part})
    (sharded / "consolidated.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))

    ids = torch.randint(3, 32000, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (single, sharded):
        loaded = load_model(folder, device="cpu", dtype="float32")
        loaded.model.setup_cache(64)
        with torch.no_grad():
            logits.append(loaded.model(ids, 0, all_logits=True))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


# ---- tokenizer files -------------------------------------------------------------------------------------------


def test_tokenizer_v3_wins_over_a_bare_tokenizer_model(tmp_path):
    copy_tokenizer(tmp_path, "v3")
    v1 = copy_tokenizer(tmp_path, "v1")
    v1.rename(tmp_path / "tokenizer.model")
    assert find_tokenizer_file(tmp_path).name == "tokenizer.model.v3"
    assert load_tokenizer(tmp_path).version == "v3"


def test_tekken_wins_over_sentencepiece_files(tmp_path):
    copy_tokenizer(tmp_path, "v3")
    copy_tokenizer(tmp_path, "v1").rename(tmp_path / "tokenizer.model")
    copy_tokenizer(tmp_path, "tekken")
    assert find_tokenizer_file(tmp_path).name == "tekken.json"
    assert load_tokenizer(tmp_path).is_tekken
