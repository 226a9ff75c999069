"""Tiny random checkpoints in both formats, written by the tests themselves (nothing is downloaded).

`write_tiny_model(root, kind)` builds a random HF transformers model, saves it with `save_pretrained` (the hub
layout) under `root/hf`, and converts the same weights to mistral-inference's layout under `root/native`.
Both folders get a real tokenizer file from mistral-common's bundled data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# the tokenizer files mistral-common ships (in mistral_common/data), by the names the tests give them
MISTRAL_COMMON_TOKENIZERS = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    "v7m1": "mistral_instruct_tokenizer_241114.model.v7m1",
    "tekken-240718": "tekken_240718.json",
    "tekken-240911": "tekken_240911.json",
}

TOKENIZER_FILES = {
    # name in our folder, file in mistral_common/data, vocab size
    "v1": ("tokenizer.model.v1", MISTRAL_COMMON_TOKENIZERS["v1"], 32000),
    "v2": ("tokenizer.model.v2", MISTRAL_COMMON_TOKENIZERS["v2"], 32768),
    "v3": ("tokenizer.model.v3", MISTRAL_COMMON_TOKENIZERS["v3"], 32768),
    "v7": ("tokenizer.model.v7", MISTRAL_COMMON_TOKENIZERS["v7"], 32768),
    "tekken": ("tekken.json", MISTRAL_COMMON_TOKENIZERS["tekken-240911"], 131072),
}


def mistral_common_data() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data"


def copy_tokenizer(dest: Path, tokenizer: str) -> Path | None:
    name, source, _ = TOKENIZER_FILES[tokenizer]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        import mistral_common  # noqa: F401
    except ImportError:  # the GPU machine has no mistral-common: engine-only checks need no tokenizer
        return None
    shutil.copy(mistral_common_data() / source, dest / name)
    return dest / name


def write_small_tekken(dest: Path, version: str, special_tokens: list[str] | None = None) -> Path:
    """A tekken.json of another version, cut from mistral-common's tekken_240911.json to 20000 vocabulary tokens;
    `special_tokens` lists the file's own special tokens in rank order (v7 files leave them to the defaults)."""
    data = json.loads((mistral_common_data() / "tekken_240911.json").read_text(encoding="utf-8"))
    inner = 20000
    data["vocab"] = data["vocab"][:inner]
    data["config"].update(version=version, default_vocab_size=inner + 1000, num_vocab_tokens=inner)
    data.pop("image", None)
    if special_tokens is not None:
        data["special_tokens"] = [{"rank": r, "token_str": n, "is_control": True} for r, n in enumerate(special_tokens)]
    dest.write_text(json.dumps(data), encoding="utf-8")
    return dest


@dataclass
class TinySpec:
    """The shape of a tiny model; defaults make a small Mistral with a sliding window of 16."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    hidden_dim: int = 128
    sliding_window: int | None = 16
    num_experts: int = 0
    num_experts_per_tok: int = 2
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    tokenizer: str = "v3"
    init_std: float = 0.15
    seed: int = 0


SPECS = {
    "mistral": TinySpec(),
    "mixtral": TinySpec(num_experts=4, sliding_window=None, rope_theta=1e6),
    "nemo": TinySpec(head_dim=24, sliding_window=None, rope_theta=1e6, tokenizer="v3"),
}

# Shapes of the AWQ fixtures (tests/fixtures/make_awq_fixture.py): every projection's input a multiple of 128
AWQ_SPECS = {
    "mistral": TinySpec(dim=128, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=2, init_std=0.05),
    "mixtral": TinySpec(dim=128, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=1, num_experts=3,
                        sliding_window=None, rope_theta=1e6, init_std=0.05),
}
_AWQ_PROJECTION = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|experts\.\d+\.w[123])\.weight$")


def awq_projection(name: str) -> bool:
    """Whether an HF tensor name is one AutoAWQ quantizes (the projections; not lm_head or the router)."""
    return _AWQ_PROJECTION.search(name) is not None


def hf_model(spec: TinySpec):
    """A random transformers model of the spec's shape, in float32."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    vocab = TOKENIZER_FILES[spec.tokenizer][2]
    common = dict(
        vocab_size=vocab,
        hidden_size=spec.dim,
        intermediate_size=spec.hidden_dim,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim or spec.dim // spec.n_heads,
        max_position_embeddings=spec.max_seq_len,
        rms_norm_eps=1e-5,
        sliding_window=spec.sliding_window,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=False,
        initializer_range=spec.init_std,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(spec.seed)
    if spec.num_experts:
        config = MixtralConfig(num_local_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                               **common)
        model = MixtralForCausalLM(config)
    else:
        model = MistralForCausalLM(config=MistralConfig(**common))
    with torch.no_grad():  # norms away from 1 so that a missed norm weight shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.float().eval()


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order back to mistral-inference's interleaved order."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_native(state: dict[str, torch.Tensor], spec: TinySpec) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        n = name.replace("model.", "", 1) if name.startswith("model.") else name
        n = (n.replace("embed_tokens", "tok_embeddings").replace("lm_head", "output")
             .replace("self_attn.q_proj", "attention.wq").replace("self_attn.k_proj", "attention.wk")
             .replace("self_attn.v_proj", "attention.wv").replace("self_attn.o_proj", "attention.wo")
             .replace("mlp.gate_proj", "feed_forward.w1").replace("mlp.down_proj", "feed_forward.w2")
             .replace("mlp.up_proj", "feed_forward.w3").replace("block_sparse_moe", "feed_forward")
             .replace("input_layernorm", "attention_norm").replace("post_attention_layernorm", "ffn_norm"))
        if n.endswith("attention.wq.weight"):
            w = _unpermute(w, spec.n_heads)
        elif n.endswith("attention.wk.weight"):
            w = _unpermute(w, spec.n_kv_heads)
        out[n] = w.contiguous()
    return out


def native_params(spec: TinySpec) -> dict:
    params = {
        "dim": spec.dim,
        "n_layers": spec.n_layers,
        "head_dim": spec.head_dim or spec.dim // spec.n_heads,
        "hidden_dim": spec.hidden_dim,
        "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads,
        "norm_eps": 1e-5,
        "vocab_size": TOKENIZER_FILES[spec.tokenizer][2],
        "rope_theta": spec.rope_theta,
        "max_seq_len": spec.max_seq_len,
    }
    if spec.sliding_window is not None:
        params["sliding_window"] = spec.sliding_window
    if spec.num_experts:
        params["moe"] = {"num_experts": spec.num_experts, "num_experts_per_tok": spec.num_experts_per_tok}
    return params


def write_tiny_model(root: Path, kind: str = "mistral", shard_hf: bool = False, **overrides) -> dict[str, Path]:
    """Write `root/hf` and `root/native` holding the same random weights; returns both paths."""
    spec = SPECS[kind]
    spec = TinySpec(**{**spec.__dict__, **overrides})
    root = Path(root)
    hf_dir, native_dir = root / "hf", root / "native"
    model = hf_model(spec)
    model.save_pretrained(hf_dir, max_shard_size="200KB" if shard_hf else "5GB")
    copy_tokenizer(hf_dir, spec.tokenizer)

    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    native_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf_to_native(state, spec), native_dir / "consolidated.safetensors")
    (native_dir / "params.json").write_text(json.dumps(native_params(spec), indent=2))
    copy_tokenizer(native_dir, spec.tokenizer)
    return {"hf": hf_dir, "native": native_dir}


def greedy_past_the_window(model, compiled: bool = False) -> tuple[list[int], torch.Tensor]:
    """Greedy decode of a model whose sliding window is 16: an 8-token prompt, then 20 tokens one at a time
    (the rotating cache wraps), eager or through the compiled decode step. The ids, prompt included, and the 20
    decode steps' logits."""
    from mistral_chat.engine.decode import DecodeStep

    model.setup_cache(64, prefill_chunk=8)
    step = DecodeStep(model, compile=True) if compiled else lambda token, pos: model(token, pos)[:, -1]
    ids, seen = [5, 9, 14, 3, 22, 7, 8, 30], []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), 0)[:, -1]
        for pos in range(8, 28):
            token = logits.argmax(-1)
            ids.append(int(token))
            logits = step(token.view(1, 1), pos)
            seen.append(logits)
    return ids, torch.cat(seen)


def random_model(config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 quantize: str | None = None, plan=None, **changes):
    """The engine's `loader.random_model` (weights from a generator seeded with 0: the same config and dtype give
    the same weights whatever the plan), on the CPU in float32 by default. `plan`: a KernelPlan, by default the
    one the loader would choose (on the CPU, the Triton kernels only under TRITON_INTERPRET=1); `changes`: fields
    of that plan to replace, e.g. `random_model(config, gemv="triton")`."""
    import dataclasses

    from mistral_chat.engine.loader import random_model as make
    from mistral_chat.engine.plan import choose_plan

    device = torch.device(device)
    plan = plan or choose_plan(device, dtype, 1, quantize)
    return make(config, device, dtype, quantize, dataclasses.replace(plan, **changes) if changes else plan)


def count_calls(module, name: str) -> list:
    """Replace module.name by a wrapper that appends to the returned list at each call (code that looks the
    function up on the module at each call, as the model does for its kernels, goes through it)."""
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, counted)
    return calls


def checks_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -c` check that imports these helpers (tests/ on its PYTHONPATH)."""
    import os

    here = str(Path(__file__).resolve().parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])), **extra)


def run_interpreted(script: str, *args: str, timeout: int = 900) -> str:
    """`python -c script args` run under Triton's interpreter (TRITON_INTERPRET=1, these helpers importable): its
    stdout, once it has exited 0 (else the assertion shows its stderr's end)."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=checks_env(TRITON_INTERPRET="1"), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def compile_for_hopper(kernel, signature: dict[str, str], constexprs: dict, num_warps: int = 4):
    """A Triton kernel (a JITFunction) compiled for an H100 (sm_90) with Triton's own ptxas, as the GPU would
    compile it: checks what the CPU's interpreter cannot run (inline PTX, GPU-only loads). Skips the test where
    Triton or its ptxas is missing."""
    import pytest

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature=signature | dict.fromkeys(constexprs, "constexpr"), constexprs=constexprs)
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except RuntimeError as e:
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no ptxas here: {e}")
        raise
