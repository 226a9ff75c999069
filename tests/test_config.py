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


# ---- wrong types and sizes: one line naming the key and what it must be ----------------------------------------


@pytest.mark.parametrize("key, value, expected", [
    ("dim", "sixty-four", "'dim' must be a positive integer, got 'sixty-four'"),
    ("dim", 64.7, "'dim' must be a positive integer, got 64.7"),
    ("dim", -64, "'dim' must be a positive integer, got -64"),
    ("dim", True, "'dim' must be a positive integer, got True"),
    ("dim", [64], "'dim' must be a positive integer, got [64]"),
    ("n_heads", 0, "'n_heads' must be a positive integer, got 0"),
    ("n_kv_heads", 0, "'n_kv_heads' must be a positive integer, got 0"),
    ("n_kv_heads", 3, "'n_heads' (4) must be a multiple of 'n_kv_heads' (3)"),
    ("n_layers", "2", "'n_layers' must be a positive integer, got '2'"),
    ("head_dim", 0, "'head_dim' must be a positive integer, got 0"),
    ("hidden_dim", -1, "'hidden_dim' must be a positive integer, got -1"),
    ("vocab_size", 3.5e4, None),  # an integral float is that integer
    ("vocab_size", 0, "'vocab_size' must be a positive integer, got 0"),
    ("norm_eps", 0, "'norm_eps' must be a positive number, got 0"),
    ("norm_eps", "tiny", "'norm_eps' must be a positive number, got 'tiny'"),
    ("rope_theta", -1.0, "'rope_theta' must be a positive number, got -1.0"),
    ("max_seq_len", 0, "'max_seq_len' must be a positive integer, got 0"),
    ("moe", [8, 2], "'moe' must be an object"),
    ("moe", {"num_experts": 8, "num_experts_per_tok": 0}, "'num_experts_per_tok' must be a positive integer"),
    ("moe", {"num_experts": 2, "num_experts_per_tok": 4}, "'num_experts_per_tok' (4) is more than 'num_experts' (2)"),
])
def test_params_with_wrong_types_or_sizes_are_refused_naming_the_key(key, value, expected):
    from mistral_chat.errors import ModelFilesError

    data = {**PARAMS, key: value}
    if expected is None:
        assert parse_params(data, source="x/params.json").vocab_size == 35000
        return
    with pytest.raises(ModelFilesError) as info:
        parse_params(data, source="x/params.json")
    message = str(info.value)
    assert message.startswith("x/params.json") and expected in message and "\n" not in message


def test_params_without_head_dim_need_dim_divisible_by_heads():
    from mistral_chat.errors import ModelFilesError

    data = {k: v for k, v in PARAMS.items() if k != "head_dim"}
    assert parse_params({**data, "dim": 64}).head_dim == 16
    with pytest.raises(ModelFilesError, match="'dim' \\(66\\) is not divisible by 'n_heads' \\(4\\)"):
        parse_params({**data, "dim": 66})


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size", "64", "'hidden_size' must be a positive integer"),
    ("num_attention_heads", 0, "'num_attention_heads' must be a positive integer, got 0"),
    ("intermediate_size", 12.5, "'intermediate_size' must be a positive integer, got 12.5"),
    ("rms_norm_eps", -1e-5, "'rms_norm_eps' must be a positive number"),
    ("rope_theta", "big", "'rope_theta' must be a positive number"),
    ("max_position_embeddings", -1, "'max_position_embeddings' must be a positive integer"),
])
def test_hf_config_with_wrong_types_or_sizes_is_refused_naming_the_key(key, value, expected):
    from mistral_chat.errors import ModelFilesError

    with pytest.raises(ModelFilesError) as info:
        parse_hf_config({**HF_CONFIG, key: value}, source="x/config.json")
    assert expected in str(info.value) and "\n" not in str(info.value)


_READ_AS_USER = """
import sys
from mistral_chat.engine.config import load_config
from mistral_chat.errors import ModelFilesError
from mistral_chat.models.files import select_local_files
for read in (load_config, select_local_files)[:int(sys.argv[2])]:
    try:
        read(sys.argv[1])
    except ModelFilesError as exc:
        print(exc)
    else:
        print("no error")
"""


def _read_as_user(folder: str, readers: int) -> list[str]:
    """Each reader's error line, run as a user permissions apply to (as root, a subprocess as nobody: root reads
    anything)."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-c", _READ_AS_USER, folder, str(readers)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop to another user")
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run([*drop, sys.executable, "-c", "import mistral_chat.engine.config"], capture_output=True,
                               timeout=60, cwd="/", env={**os.environ, "PYTHONPATH": os.getcwd()})
        if probe.returncode != 0:  # e.g. a checkout inside a folder only root may enter (mktemp -d)
            pytest.skip("the checkout or its virtualenv is not readable by an unprivileged user")
        command = [*drop, *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/",
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_model_folder_without_read_permission_is_one_line():
    import os
    import tempfile

    base = tempfile.mkdtemp(prefix="unreadable-")  # outside pytest's tmp folder, which only root may enter
    folder = os.path.join(base, "model")
    try:
        os.chmod(base, 0o755)
        os.mkdir(folder)
        with open(os.path.join(folder, "params.json"), "w") as f:
            json.dump(PARAMS, f)
        os.chmod(os.path.join(folder, "params.json"), 0o644)
        for mode in (0o000, 0o700, 0o711):  # nothing; the owner only; traversable but not listable
            os.chmod(folder, mode)
            lines = _read_as_user(folder, 2 if mode != 0o711 else 1)
            for line in lines:
                assert "cannot read the model folder" in line and folder in line and "permission denied" in line, line
        os.chmod(folder, 0o755)
        os.chmod(os.path.join(folder, "params.json"), 0o000)
        (line,) = _read_as_user(folder, 1)
        assert line.startswith("cannot read") and "params.json (permission denied)" in line, line
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(base)
