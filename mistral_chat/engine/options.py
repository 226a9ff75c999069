"""What a run asks of the engine, declared once for the CLI, the TUI, the service and the engine alike:
how to load a model (`LoadOptions`) and how to sample its answers (`SamplingParams`).

Plain data with no torch import, so that the TUI can build them before its first frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_SPECULATE = 16  # most draft tokens a speculative verify step checks


@dataclass(frozen=True)
class LoadOptions:
    """Where and how a model loads: device, dtype, context, weight quantization, compiled decode, a LoRA adapter
    merged at load time, and the number of tensor-parallel processes (one a GPU)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N (with tp > 1: auto, cpu or cuda; rank r uses cuda:r)
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    context_length: int | None = None  # None: the model's own, at most 32768 (see engine/memory.py)
    quantize: str | None = None  # int8 or int4: weight-only quantization at load time
    compile: bool = True  # on CUDA: decode as CUDA graphs (never on the CPU)
    lora: Path | None = None  # a mistral-finetune adapter (lora.safetensors or its folder)
    lora_scale: float = 1.0  # multiplies the adapter's own scaling
    tp: int = 1  # tensor-parallel processes

    def __post_init__(self) -> None:
        if self.lora is not None and not isinstance(self.lora, Path):
            object.__setattr__(self, "lora", Path(self.lora))
        if self.tp < 1:
            raise ValueError(f"tensor-parallel processes must be >= 1, got {self.tp}")

    def load_kwargs(self) -> dict[str, Any]:
        """The keywords of `engine.loader.load_model`: `load_model(path, **options.load_kwargs())` (tp is the
        caller's business: the tensor-parallel launcher loads each rank's shard)."""
        return {"device": self.device, "dtype": self.dtype, "context_length": self.context_length,
                "quantize": self.quantize, "compile": self.compile, "lora": self.lora,
                "lora_scale": self.lora_scale}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Temperature 0 means greedy. Also a conversation's stored settings
    (`from_json` reads them back); ValueError when a value is out of range."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 1024
    seed: int | None = None
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest one
    repetition_penalty: float = 1.0  # > 1 discourages any token of the prompt or the answer so far
    presence_penalty: float = 0.0  # subtracted from the logit of tokens already in the answer
    stop: tuple[str, ...] = field(default_factory=tuple)  # the answer ends before the first of these strings
    # draft tokens checked per step by prompt lookup (engine/speculate.py); 0: off; None: automatic (speculate.py's
    # AUTO_DRAFTS where measured to pay: one GPU, a dense model of float weights, no penalties; else off)
    speculate: int | None = None

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min-p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max tokens must be >= 1, got {self.max_tokens}")
        if self.speculate is not None and not 0 <= self.speculate <= MAX_SPECULATE:
            raise ValueError(f"speculate must be in 0..{MAX_SPECULATE} draft tokens, got {self.speculate}")

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "SamplingParams":
        """Settings as stored (`dataclasses.asdict` as JSON): unknown keys are ignored, missing ones take their
        defaults (older databases lack the newer fields), a single stop string counts as one."""
        known = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        if "stop" in known:
            stop = known["stop"]
            known["stop"] = (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop or ())
        return cls(**known)
