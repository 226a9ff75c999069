"""LoRA adapters from Mistral's fine-tuning tools (mistral-finetune), merged into the weights while loading.

mistral-finetune saves `lora.safetensors` next to a `params.json` of the model it trained, whose "lora" entry
holds {"rank", "scaling", ...}. Each adapted projection `layers.N.attention.wq` (wq/wk/wv/wo,
feed_forward.w1/w2/w3, or feed_forward.experts.E.w1/w2/w3 for Mixtral) has `lora_A.weight` [rank, in] and
`lora_B.weight` [out, rank], and its output is `W x + scaling * B A x`. `scaling` is the factor itself (not
alpha / rank); without a params.json it is 2.0, the default of mistral-finetune and mistral-inference.

Merging: W' = W + scale * B @ A, computed in float32 on the load device from the checkpoint tensor (after the q/k
un-permute of a Hugging Face checkpoint: the adapter is in the native, interleaved layout) before the fused
wqkv/w13 tensors are built and before int8 quantization. A tensor-parallel rank merges only its own rows
(B[rows] @ A) or columns (B @ A[:, cols]), which equals merging the whole matrix and then slicing it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mistral_chat.engine.config import ModelConfig
from mistral_chat.errors import ModelFilesError

log = logging.getLogger(__name__)

ADAPTER_FILE = "lora.safetensors"
DEFAULT_SCALING = 2.0  # mistral-finetune's LoraArgs.scaling and mistral-inference's load_lora default

_MODULE = re.compile(r"layers\.(\d+)\.(attention\.w[qkvo]|feed_forward\.w[123]|feed_forward\.experts\.(\d+)\.w[123])")
_SUFFIX = re.compile(r"\.lora_([AB])\.weight$")


class LoraError(ModelFilesError):
    """A LoRA adapter file that is missing, corrupt or does not fit the model."""


@dataclass
class LoraAdapter:
    """Low-rank updates by module name (`layers.0.attention.wq`): A [rank, in] and B [out, rank], float32."""

    path: Path
    scaling: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def merge(self, module: str, w: torch.Tensor, rows: slice | None = None,
              cols: slice | None = None) -> torch.Tensor:
        """`w` (the `rows`/`cols` slice of `module`'s weight) plus its update, in float32 on the adapter's
        device; `w` unchanged when the adapter leaves `module` alone."""
        pair = self.pairs.get(module)
        if pair is None:
            return w
        a, b = pair
        if rows is not None:
            b = b[rows]
        if cols is not None:
            a = a[:, cols]
        return torch.addmm(w.to(device=a.device, dtype=torch.float32), b, a, alpha=self.scaling)

    def to(self, device: torch.device) -> "LoraAdapter":
        self.pairs = {k: (a.to(device), b.to(device)) for k, (a, b) in self.pairs.items()}
        return self


def adapter_file(path: Path) -> Path:
    """The adapter's safetensors file: `path` itself, or `path/lora.safetensors` for a checkpoint folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise LoraError(f"LoRA adapter {path} does not exist: pass --lora the lora.safetensors file of a "
                        "mistral-finetune checkpoint, or the folder holding it")
    return path


def adapter_scaling(file: Path) -> float:
    """`lora.scaling` from the params.json next to the adapter (mistral-finetune writes it), else 2.0."""
    params = file.parent / "params.json"
    if not params.is_file():
        log.info("no params.json next to %s: LoRA scaling %.1f (mistral-finetune's default)", file, DEFAULT_SCALING)
        return DEFAULT_SCALING
    try:
        data = json.loads(params.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"{params} is not valid JSON ({exc}): fix it or move the adapter out of that folder") from exc
    lora = data.get("lora") if isinstance(data, dict) else None
    scaling = lora.get("scaling") if isinstance(lora, dict) else None
    if scaling is None:
        return DEFAULT_SCALING
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise LoraError(f"{params}: lora.scaling should be a number, got {scaling!r}: fix the file")
    return float(scaling)


def load_adapter(path: Path, config: ModelConfig, scale: float = 1.0,
                 device: torch.device | str = "cpu") -> LoraAdapter:
    """Read and check an adapter for `config`'s model; its updates are multiplied by scaling * `scale`."""
    file = adapter_file(path)
    try:
        tensors = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraError(f"LoRA adapter {file} is truncated or not a safetensors file ({exc}): "
                        "copy it again from the fine-tuning run") from exc
    if not tensors:
        raise LoraError(f"LoRA adapter {file} holds no tensors: pass the lora.safetensors of a fine-tuning run")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        suffix = _SUFFIX.search(name)
        if suffix is None:
            raise LoraError(f"tensor '{name}' in {file} is not a LoRA A/B weight: "
                            "pass the lora.safetensors that mistral-finetune saved")
        halves.setdefault(name[:suffix.start()], {})[suffix.group(1)] = t
    adapter = LoraAdapter(path=file, scaling=adapter_scaling(file) * scale)
    for module, pair in sorted(halves.items()):
        out_dim, in_dim = _module_shape(module, config, file)
        if set(pair) != {"A", "B"}:
            present, missing = next(iter(pair)), ({"A", "B"} - set(pair)).pop()
            raise LoraError(f"LoRA adapter {file} has {module}.lora_{present}.weight but no "
                            f"{module}.lora_{missing}.weight: the file is incomplete, copy it again")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
            raise LoraError(f"LoRA tensors {module}.lora_A/B in {file} have shapes {list(a.shape)} and "
                            f"{list(b.shape)}, but the model needs [rank, {in_dim}] and [{out_dim}, rank]: "
                            "the adapter was trained for another model")
        adapter.pairs[module] = (a.float(), b.float())
    log.info("LoRA adapter %s: %d projections, scaling %g", file, len(adapter.pairs), adapter.scaling)
    return adapter.to(torch.device(device))


def _module_shape(module: str, config: ModelConfig, file: Path) -> tuple[int, int]:
    """(out, in) of the projection the adapter names, or LoraError when the model has no such projection."""
    c = config
    match = _MODULE.fullmatch(module)
    if match is None:
        hint = " (a PEFT/Hugging Face adapter? mistral-chat reads mistral-finetune's layout)" \
            if module.startswith("base_model.") else ""
        raise LoraError(f"LoRA adapter {file} adapts '{module}', which is not a projection mistral-chat "
                        f"can adapt (attention wq/wk/wv/wo, feed_forward w1/w2/w3){hint}")
    layer, kind, expert = int(match.group(1)), match.group(2), match.group(3)
    if layer >= c.n_layers:
        raise LoraError(f"LoRA adapter {file} adapts '{module}', but the model has only {c.n_layers} layers: "
                        "the adapter was trained for another model")
    if expert is not None and not c.is_moe:
        raise LoraError(f"LoRA adapter {file} adapts MoE expert '{module}', but the model is not a mixture of "
                        "experts: the adapter was trained for another model")
    if expert is None and kind.startswith("feed_forward") and c.is_moe:
        raise LoraError(f"LoRA adapter {file} adapts dense '{module}', but the model is a mixture of experts: "
                        "the adapter was trained for another model")
    if expert is not None and int(expert) >= c.num_experts:
        raise LoraError(f"LoRA adapter {file} adapts '{module}', but the model has only {c.num_experts} "
                        "experts: the adapter was trained for another model")
    projection = kind.rsplit(".", 1)[1]
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {"wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim), "wo": (c.dim, q),
            "w1": (c.hidden_dim, c.dim), "w3": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim)}[projection]
