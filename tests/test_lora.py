"""LoRA adapters in mistral-finetune's layout, merged while loading, equal the base model plus the adapter.

References: peft running the (unmerged) adapter on HF transformers' model, and an HF checkpoint whose weights
were merged by hand (W + s * B @ A, q/k rows permuted to HF's order) loaded by transformers itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_chat.engine.config import load_config
from mistral_chat.engine.lora import DEFAULT_SCALING, LoraError, load_adapter
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.parallel.sharding import Parallel
from mistral_chat.engine.weights import CheckpointReader, checkpoint_state, plain_convert
from tiny_models import write_tiny_model

RANK = 4
HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    return {kind: write_tiny_model(root / kind, kind) for kind in ("mistral", "mixtral")}


def adapter_tensors(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random A/B pairs for every projection mistral-finetune adapts (experts too for Mixtral)."""
    c = load_config(path)
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"attention.wq": (q, c.dim), "attention.wk": (kv, c.dim), "attention.wv": (kv, c.dim),
              "attention.wo": (c.dim, q)}
    ffn = {"w1": (c.hidden_dim, c.dim), "w3": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim)}
    if c.is_moe:
        shapes.update({f"feed_forward.experts.{e}.{w}": s for e in range(c.num_experts) for w, s in ffn.items()})
    else:
        shapes.update({f"feed_forward.{w}": s for w, s in ffn.items()})
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(c.n_layers):
        for name, (rows, cols) in shapes.items():
            out[f"layers.{i}.{name}.lora_A.weight"] = 0.1 * torch.randn(RANK, cols, generator=g)
            out[f"layers.{i}.{name}.lora_B.weight"] = 0.1 * torch.randn(rows, RANK, generator=g)
    return out


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], scaling: float | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "lora.safetensors")
    if scaling is not None:  # what mistral-finetune writes next to lora.safetensors (model args)
        (folder / "params.json").write_text(json.dumps({"dim": 64, "lora": {"enable": True, "rank": RANK,
                                                                              "dropout": 0.0, "scaling": scaling}}))
    return folder


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Native interleaved q/k rows to HF's rotate-half order (inverse of the loader's un-permute)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_name(native_module: str) -> str:
    layer, rest = native_module.split(".", 2)[1], native_module.split(".", 2)[2]
    if rest.startswith("feed_forward.experts."):
        return f"model.layers.{layer}.block_sparse_moe.experts.{rest.split('.', 2)[2]}.weight"
    return f"model.layers.{layer}.{HF_NAMES[rest]}.weight"


def merged_hf_folder(hf_dir: Path, dest: Path, tensors: dict[str, torch.Tensor], scale: float) -> Path:
    """An HF checkpoint with the adapter merged by hand into its weights."""
    config = load_config(hf_dir)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removesuffix(".lora_A.weight")
        delta = scale * (tensors[f"{module}.lora_B.weight"] @ a)
        if module.endswith("attention.wq"):
            delta = permute(delta, config.n_heads)
        elif module.endswith("attention.wk"):
            delta = permute(delta, config.n_kv_heads)
        state[hf_name(module)] = state[hf_name(module)] + delta
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(hf_dir / "config.json", dest / "config.json")
    save_file(state, dest / "model.safetensors")
    return dest


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def prompt(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 32000, (1, n), generator=torch.Generator().manual_seed(seed))


def engine(path: Path, **kw):
    return load_model(path, device="cpu", dtype="float32", **kw).model


def engine_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.setup_cache(128)
    with torch.no_grad():
        return model(ids, 0, all_logits=True)


def engine_greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    model.setup_cache(128, prefill_chunk=8)
    got, pos = [], 0
    with torch.no_grad():
        for start in range(0, ids.shape[1], 8):
            logits = model(ids[:, start:start + 8], start_pos=pos)
            pos += ids[:, start:start + 8].shape[1]
        for _ in range(steps):
            got.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[got[-1]]]), start_pos=pos)
            pos += 1
    return got


def hf_greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


def peft_reference(hf_dir: Path, tensors: dict[str, torch.Tensor], scale: float):
    """HF's model with the adapter attached by peft (computed unmerged: x W^T + s * x A^T B^T)."""
    peft = pytest.importorskip("peft")
    config = load_config(hf_dir)
    base = hf_model(hf_dir)
    lora_config = peft.LoraConfig(r=RANK, lora_alpha=scale * RANK, lora_dropout=0.0,
                                  target_modules=sorted({v.split(".")[-1] for v in HF_NAMES.values()}))
    model = peft.get_peft_model(base, lora_config).eval()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.removesuffix(".lora_A.weight")
            b = tensors[f"{module}.lora_B.weight"]
            if module.endswith("attention.wq"):
                b = permute(b, config.n_heads)
            elif module.endswith("attention.wk"):
                b = permute(b, config.n_kv_heads)
            target = modules["base_model.model." + hf_name(module).removesuffix(".weight")]
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(b)
    return model


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_merged_adapter_matches_peft(tiny, tmp_path, fmt):
    paths = tiny["mistral"]
    tensors = adapter_tensors(paths["native"])
    adapter = write_adapter(tmp_path / "adapter", tensors, scaling=2.0)
    reference = peft_reference(paths["hf"], tensors, scale=2.0 * 0.5)
    ids = prompt()
    with torch.no_grad():
        expected = reference(ids).logits
        base = hf_model(paths["hf"])(ids).logits
    model = engine(paths[fmt], lora=adapter / "lora.safetensors", lora_scale=0.5)
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(engine_logits(model, ids), expected, atol=1e-4, rtol=1e-4)
    assert engine_greedy(model, ids[:, :20], 24) == hf_greedy(reference, ids[:, :20], 24)


@pytest.mark.slow
def test_mixtral_expert_adapter_matches_merged_reference(tiny, tmp_path):
    """Experts merge the same way from either format (the q/k permute of HF checkpoints is tested above)."""
    paths, fmt = tiny["mixtral"], "native"
    tensors = adapter_tensors(paths["native"], seed=3)
    adapter = write_adapter(tmp_path / "adapter", tensors, scaling=None)  # no params.json: scaling 2.0
    reference = hf_model(merged_hf_folder(paths["hf"], tmp_path / "merged", tensors, DEFAULT_SCALING))
    ids = prompt()
    with torch.no_grad():
        expected = reference(ids).logits
    model = engine(paths[fmt], lora=adapter)
    torch.testing.assert_close(engine_logits(model, ids), expected, atol=1e-4, rtol=1e-4)
    assert engine_greedy(model, ids[:, :20], 16) == hf_greedy(reference, ids[:, :20], 16)


def test_int8_quantizes_the_merged_weights(tiny, tmp_path):
    native = tiny["mistral"]["native"]
    tensors = adapter_tensors(native, seed=5)
    adapter = write_adapter(tmp_path / "adapter", tensors, scaling=1.5)
    merged = tmp_path / "merged"
    shutil.copytree(native, merged)
    state = load_file(native / "consolidated.safetensors")
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.removesuffix(".lora_A.weight")
            state[f"{module}.weight"] = torch.addmm(state[f"{module}.weight"], tensors[f"{module}.lora_B.weight"],
                                                    a, alpha=1.5)
    save_file(state, merged / "consolidated.safetensors")
    with_adapter = load_model(native, device="cpu", dtype="float32", quantize="int8", lora=adapter)
    premerged = load_model(merged, device="cpu", dtype="float32", quantize="int8")
    got, expected = with_adapter.model.state_dict(), premerged.model.state_dict()
    assert got.keys() == expected.keys()
    assert with_adapter.model.layers[0].attention.wqkv.weight.dtype == torch.int8
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["native", "hf"])
@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_tensor_parallel_ranks_merge_their_slices(tiny, tmp_path, kind, fmt):
    """Each rank's merged shard equals the same slice of the whole merged weight."""
    path = tiny[kind][fmt]
    config = load_config(path)
    adapter = load_adapter(write_adapter(tmp_path / "a", adapter_tensors(tiny[kind]["native"]), 2.0), config)
    convert = plain_convert(torch.device("cpu"), torch.float32)
    full = checkpoint_state(CheckpointReader(path, config.checkpoint_format), config, Parallel(), convert,
                            adapter=adapter)
    hd = config.head_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    for rank in range(2):
        part = checkpoint_state(CheckpointReader(path, config.checkpoint_format), config, Parallel(rank, 2),
                                convert, adapter=adapter)
        for i in range(config.n_layers):
            p = f"layers.{i}"
            wq, wk, wv = full[f"{p}.attention.wqkv.weight"].split([q, kv, kv])
            rows, kv_rows = slice(rank * q // 2, (rank + 1) * q // 2), slice(rank * kv // 2, (rank + 1) * kv // 2)
            torch.testing.assert_close(part[f"{p}.attention.wqkv.weight"],
                                       torch.cat([wq[rows], wk[kv_rows], wv[kv_rows]]), atol=1e-6, rtol=0)
            torch.testing.assert_close(part[f"{p}.attention.wo.weight"], full[f"{p}.attention.wo.weight"][:, rows],
                                       atol=1e-6, rtol=0)
            h = config.hidden_dim // 2
            w1, w3 = full[f"{p}.feed_forward.w13" + ("" if kind == "mixtral" else ".weight")].split(
                config.hidden_dim, dim=-2)
            hidden = slice(rank * h, (rank + 1) * h)
            got13 = part[f"{p}.feed_forward.w13" + ("" if kind == "mixtral" else ".weight")]
            torch.testing.assert_close(got13, torch.cat([w1[..., hidden, :], w3[..., hidden, :]], dim=-2),
                                       atol=1e-6, rtol=0)


def test_lora_scale_and_scaling(tiny, tmp_path):
    native = tiny["mistral"]["native"]
    config = load_config(native)
    tensors = adapter_tensors(native)
    assert load_adapter(write_adapter(tmp_path / "a", tensors, None), config).scaling == DEFAULT_SCALING
    assert load_adapter(write_adapter(tmp_path / "b", tensors, 0.75), config, scale=2.0).scaling == 1.5
    ids = prompt(24)
    base = engine_logits(engine(native), ids)
    torch.testing.assert_close(engine_logits(engine(native, lora=tmp_path / "a", lora_scale=0.0), ids), base,
                               atol=0, rtol=0)


def _error(tmp_path: Path, config, tensors: dict[str, torch.Tensor]) -> str:
    folder = write_adapter(tmp_path / f"bad{len(list(tmp_path.iterdir()))}", tensors, None)
    with pytest.raises(LoraError) as info:
        load_adapter(folder, config)
    return str(info.value)


def test_adapter_errors_name_the_file_and_tensor(tiny, tmp_path):
    native = tiny["mistral"]["native"]
    config = load_config(native)
    good = adapter_tensors(native)

    with pytest.raises(LoraError, match="does not exist"):
        load_model(native, device="cpu", dtype="float32", lora=tmp_path / "nowhere.safetensors")
    corrupt = tmp_path / "corrupt" / "lora.safetensors"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraError, match="corrupt|truncated"):
        load_adapter(corrupt, config)

    bad = dict(good, **{"layers.0.attention.wq.lora_B.weight": torch.zeros(32, RANK)})
    msg = _error(tmp_path, config, bad)
    assert "layers.0.attention.wq" in msg and "[32, 4]" in msg and "another model" in msg

    extra = dict(good, **{"layers.7.attention.wq.lora_A.weight": torch.zeros(RANK, 64),
                          "layers.7.attention.wq.lora_B.weight": torch.zeros(64, RANK)})
    assert "layers.7.attention.wq" in _error(tmp_path, config, extra) and "2 layers" in _error(tmp_path, config, extra)

    experts = {"layers.0.feed_forward.experts.0.w1.lora_A.weight": torch.zeros(RANK, 64),
               "layers.0.feed_forward.experts.0.w1.lora_B.weight": torch.zeros(128, RANK)}
    assert "not a mixture of experts" in _error(tmp_path, config, experts)

    half = {k: v for k, v in good.items() if k != "layers.1.feed_forward.w2.lora_B.weight"}
    assert "layers.1.feed_forward.w2.lora_B.weight" in _error(tmp_path, config, half)

    peft_style = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(RANK, 64)}
    assert "PEFT" in _error(tmp_path, config, peft_style)

    norm = {"layers.0.attention_norm.lora_A.weight": torch.zeros(RANK, 64),
            "layers.0.attention_norm.lora_B.weight": torch.zeros(64, RANK)}
    assert "layers.0.attention_norm" in _error(tmp_path, config, norm)
