"""AutoAWQ 4-bit checkpoints load into the engine's int4 format (awq.py), checked against AutoAWQ's own code.

The fixtures (tests/fixtures/awq/, made by tests/fixtures/make_awq_fixture.py) hold projections packed by AutoAWQ
0.2.9's `WQLinear_GEMM.from_linear` and, beside them, AutoAWQ's `dequantize_gemm` of the packed tensors (exact in
fp16: the fixture's scales have 7 significant bits). Each test builds two folders from them: the AWQ checkpoint
(config.json with quantization_config, fp16 embeddings/norms/lm_head) and a plain float32 HF checkpoint with the
same weights, the projections being AutoAWQ's dequantization.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_chat.engine import int4
from mistral_chat.engine.config import load_config
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.memory import estimate_memory
from mistral_chat.engine.parallel.sharding import Parallel
from mistral_chat.engine.quant import Int8Linear
from mistral_chat.engine.weights import CheckpointReader, checkpoint_state, plain_convert
from mistral_chat.errors import MistralChatError, ModelFilesError
from tiny_models import AWQ_SPECS, awq_projection, copy_tokenizer, hf_model

FIXTURES = Path(__file__).parent / "fixtures" / "awq"
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
KINDS = list(AWQ_SPECS)


def write_pair(root: Path, kind: str) -> dict[str, Path]:
    """`root/awq` (the AWQ checkpoint) and `root/hf` (float32, projections = AutoAWQ's dequantization)."""
    spec = AWQ_SPECS[kind]
    hf_dir, awq_dir = root / "hf", root / "awq"
    hf_model(spec).save_pretrained(hf_dir)
    copy_tokenizer(hf_dir, spec.tokenizer)
    state = load_file(hf_dir / "model.safetensors")
    reference = load_file(FIXTURES / f"{kind}-reference.safetensors")
    assert set(reference) == {name for name in state if awq_projection(name)}
    # the rest rounded to fp16, as AWQ files hold it
    state = {name: (reference[name] if name in reference else t.half()).float() for name, t in state.items()}
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    awq_dir.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    (awq_dir / "config.json").write_text(json.dumps({**config, "quantization_config": AWQ}))
    packed = load_file(FIXTURES / f"{kind}-awq.safetensors")
    save_file({**{n: t.half() for n, t in state.items() if n not in reference}, **packed},
              awq_dir / "model.safetensors", metadata={"format": "pt"})
    copy_tokenizer(awq_dir, spec.tokenizer)
    return {"awq": awq_dir, "hf": hf_dir}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("awq")
    return {kind: write_pair(root / kind, kind) for kind in KINDS}


def plain_state(path: Path) -> dict[str, torch.Tensor]:
    """The HF folder's tensors as the engine names and lays them out (fused, q/k rows unpermuted), float32."""
    config = load_config(path)
    reader = CheckpointReader(path, config.checkpoint_format)
    return checkpoint_state(reader, config, Parallel(), plain_convert(torch.device("cpu"), torch.float32))


def quantized_weights(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """name -> (codes, scale, low) of each int4 tensor of an engine state dict (groups layout)."""
    found = {}
    for name, t in state.items():
        prefix = name + "_" if not name.endswith(".weight") else name.removesuffix("weight")
        if t.dtype == torch.uint8 and prefix + "low" in state:
            found[name] = (t, state[prefix + "scale"], state[prefix + "low"])
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_weights_equal_autoawqs(pairs, kind, dtype):
    """float32: exactly AutoAWQ's (q - z) * s (scale and low = -z * s are exact in float32). bf16: the fixture's
    scales are exact in bf16, low = -z * s is rounded to bf16 once (bf16's unit roundoff is 2^-8: error <= 2^-8
    |z s| <= 2^-8 * 15 s) and the dequantized weight once more (2^-8 of it): |ours - AutoAWQ| <= 2^-8 (|w| + 16 s).
    The largest error seen is about half of that bound."""
    loaded = load_model(pairs[kind]["awq"], device="cpu", dtype=str(dtype).removeprefix("torch."),
                        plan_overrides={"int4": "torch"})
    assert loaded.quantize == "int4" and loaded.config.quantization == "awq"
    ours, reference = loaded.model.state_dict(), plain_state(pairs[kind]["hf"])
    weights = quantized_weights(ours)
    assert sorted(weights) == sorted(n for n in reference if n.endswith(("wqkv.weight", "wo.weight", "w13.weight",
                                                                           "w2.weight", ".w13", ".w2")))
    for name, (codes, scale, low) in weights.items():
        got = int4.dequantize(codes, scale, low, torch.float32)
        want = reference[name]
        if dtype == torch.float32:
            assert torch.equal(got, want), name
        else:
            s = scale.float().repeat_interleave(int4.GROUP_SIZES[0], dim=-1)
            assert ((got - want).abs() <= 2.0 ** -8 * (want.abs() + 16 * s)).all(), name
    for name, t in ours.items():  # embeddings, norms, the router and lm_head: as stored (fp16), in the model dtype
        if name in reference and name not in weights and t.is_floating_point():
            assert torch.equal(t, reference[name].to(dtype)), name


@pytest.mark.parametrize("kind", KINDS)
def test_an_awq_folder_loads_as_quantize_int4_would(pairs, kind):
    """The same plan and the same int4 modules as `--quantize int4` of the float checkpoint, but the output
    projection, which AWQ keeps in fp16."""
    awq = load_model(pairs[kind]["awq"], device="cpu", dtype="bfloat16")
    ours = load_model(pairs[kind]["hf"], device="cpu", dtype="bfloat16", quantize="int4")
    assert awq.plan == ours.plan and awq.quantize == "int4"

    def modules(loaded):
        return {name: (type(m).__name__, getattr(m, "layout", None)) for name, m in loaded.model.named_modules()
                if name != "output"}

    assert modules(awq) == modules(ours)
    assert not isinstance(awq.model.output, (int4.Int4Linear, Int8Linear))
    for name, t in ours.model.state_dict().items():
        if not name.startswith("output."):
            assert awq.model.state_dict()[name].shape == t.shape, name


def hf_reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 32000, (1, n), generator=torch.Generator().manual_seed(seed))


def engine_logits(loaded, ids: torch.Tensor) -> torch.Tensor:
    loaded.model.setup_cache(256, prefill_chunk=2048)
    with torch.no_grad():
        return loaded.model(ids, start_pos=0, all_logits=True).float()


def greedy(loaded, ids: torch.Tensor, steps: int) -> list[int]:
    model = loaded.model
    model.setup_cache(128, prefill_chunk=8)
    tokens, got, pos = ids[0].tolist(), [], 0
    with torch.no_grad():
        for start in range(0, len(tokens), 8):
            chunk = torch.tensor([tokens[start:start + 8]])
            logits = model(chunk, start_pos=pos)
            pos += chunk.shape[1]
        for _ in range(steps):
            got.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[got[-1]]]), start_pos=pos)
            pos += 1
    return got


@pytest.mark.parametrize("kind", KINDS)
def test_float32_logits_and_greedy_tokens_equal_transformers_on_the_dequantized_weights(pairs, kind):
    """The weights are the same numbers (previous test), so only float32's order of operations differs: the
    tolerance of tests/test_engine_vs_hf.py (1e-4), and the same greedy tokens."""
    ids = prompt(40)
    hf = hf_reference(pairs[kind]["hf"])
    loaded = load_model(pairs[kind]["awq"], device="cpu", dtype="float32")
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(engine_logits(loaded, ids), expected, atol=1e-4, rtol=1e-4)
    ids, steps = prompt(20, seed=2), 30
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    assert greedy(loaded, ids, steps) == want


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_logits_are_as_close_to_transformers_as_a_bf16_load_of_the_float_weights(pairs, kind):
    """In bf16 (the CPU's packed int4 product), the AWQ model's logits stay within twice the error of the engine
    loading the dequantized float weights as bf16 (which rounds every weight once) of transformers' float32: the
    int4 path adds the rounding of each group's low, no more."""
    ids = prompt(40)
    with torch.no_grad():
        expected = hf_reference(pairs[kind]["hf"])(ids).logits
    awq = engine_logits(load_model(pairs[kind]["awq"], device="cpu", dtype="bfloat16"), ids)
    plain = engine_logits(load_model(pairs[kind]["hf"], device="cpu", dtype="bfloat16"), ids)
    awq_error, plain_error = (awq - expected).abs().max(), (plain - expected).abs().max()
    assert awq_error <= 2 * plain_error + 1e-3, (awq_error, plain_error)


def test_memory_estimate_counts_awq_as_int4_with_a_float_output():
    config = load_config_dict({"quantization_config": AWQ})
    plain = config.with_(quantization=None)
    awq = estimate_memory(config, torch.bfloat16, 4096)
    int4_weights = estimate_memory(plain, torch.bfloat16, 4096, quantize="int4").weights
    output_float = config.vocab_size * config.dim * 2
    output_int4 = config.vocab_size * config.dim // 2 + 2 * config.vocab_size * (config.dim // 128) * 2
    assert awq.weights == int4_weights - output_int4 + output_float
    assert estimate_memory(config, torch.bfloat16, 4096, quantize="int4") == awq
    assert 3.8e9 < awq.weights < 4.4e9  # Mistral-7B: ~4.1 GB


def load_config_dict(extra: dict):
    from mistral_chat.engine.config import parse_hf_config

    mistral_7b = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768}
    return parse_hf_config({**mistral_7b, **extra})


@pytest.mark.parametrize("quantization, says", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, "GPTQ"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "BITSANDBYTES"),
    ({**AWQ, "bits": 8}, "bits 8"),
    ({**AWQ, "zero_point": False}, "zero_point False"),
    ({**AWQ, "version": "gemv"}, "version gemv"),
    ({**AWQ, "group_size": 64}, "group_size 64"),
])
def test_other_quantizations_are_refused_in_one_line(quantization, says):
    with pytest.raises(ModelFilesError) as info:
        load_config_dict({"quantization_config": quantization})
    message = str(info.value)
    assert says in message and "bf16 release" in message and "AWQ" in message and "\n" not in message


def test_an_older_gptq_repo_with_quantize_config_json_is_refused(pairs, tmp_path):
    folder = tmp_path / "gptq"
    folder.mkdir()
    config = json.loads((pairs["mistral"]["hf"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "desc_act": False}))
    with pytest.raises(ModelFilesError, match="quantized with GPTQ"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize("options, says", [
    ({"quantize": "int8"}, "already quantized (4-bit AWQ)"),
    ({"parallel": Parallel(rank=0, world=2)}, "one device only"),
    ({"lora": "adapter"}, "LoRA"),
])
def test_what_an_awq_checkpoint_cannot_combine_with_is_one_line(pairs, options, says):
    with pytest.raises(MistralChatError, match=re.escape(says)) as info:
        load_model(pairs["mistral"]["awq"], device="cpu", **options)
    assert "\n" not in str(info.value)
