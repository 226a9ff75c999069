"""Which implementation each piece of the model runs, chosen once when the model loads.

The forward pass (model.py, moe.py, quant.py) reads its `KernelPlan`, never the environment. `choose_plan` decides
from the device, the dtype, the tensor-parallel world and what Triton supports there:

- a GPU: the Triton kernels for decode attention, int8 and int4 products, single-row bf16 products (GEMV), one
  token's Mixtral experts, the eager paths' norms, RoPE and SwiGLU, and each norm computed inside the product that
  reads it; int4 on the CPU: torch's packed int4 matmul with bf16;
- one GPU: the decode step runs eagerly, captured in CUDA graphs per cache bucket (decode.GraphedStep): full speed
  from the first token: 5.40 ms/token against compiled 5.35 on one H100 in one run, ready after 0.8 s where the
  compile took 36.6 s (docs/engine.md);
- under `--tp`: all-reduces through symmetric memory (the Lamport kernel for bf16), and decode compiled into CUDA
  graphs unless `--no-compile`;
- `MISTRAL_CHAT_KERNELS=0` turns every custom kernel off (plain PyTorch everywhere, and NCCL for every
  all-reduce), an escape hatch for a broken driver or Triton install.

The benchmark compares alternatives with `--plan KEY=VALUE` (`KernelPlan.with_overrides`); docs/engine.md tells
which alternative won each comparison and by how much.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from mistral_chat.engine.int4 import packed_matmul_available
from mistral_chat.engine.kernels.fused import INTERPRETED, triton

KERNELS_ENV = "MISTRAL_CHAT_KERNELS"

_CHOICES = {
    "attention": ("triton", "torch"),
    "gemv": ("triton", "torch"),
    "int8": ("triton", "packed", "torch"),
    "int4": ("triton", "packed", "torch"),
    "moe": ("triton", "torch"),
    "int4_experts": ("triton", "torch"),
    "all_reduce": ("none", "lamport", "symmetric", "c10d"),
}


@dataclass(frozen=True)
class KernelPlan:
    """The implementation of each piece; the defaults are plain PyTorch on one process."""

    fused: bool = False  # Triton RMSNorm, RoPE and SwiGLU on eager paths; RoPE + cache write in one kernel
    attention: str = "torch"  # decode attention: "triton" (one kernel over the cache) or "torch" (grouped matmuls)
    gemv: str = "torch"  # single-row float products: "triton" (the GEMV kernel) or "torch" (F.linear / inductor)
    # int8 products: "triton" (one row: the int8 GEMV kernel), "packed" (the CPU with bf16: torch's int8 weight
    # matmul, for every row count) or "torch" (dequantize, then multiply)
    int8: str = "torch"
    # int4 products: "triton" (one row: the int4 GEMV kernel; more: dequantize, then multiply), "packed" (the CPU:
    # torch's packed int4 matmul, for every row count) or "torch" (dequantize, then multiply)
    int4: str = "torch"
    moe: str = "torch"  # one token's chosen experts: "triton" (expert GEMV kernels) or "torch" (gathered weights)
    # one token's int4 experts: "triton" (the int4 kernel reading each chosen expert in place: full Mixtral-8x7B
    # int4 at 5.3 ms a token in 27.7 GB on an H100) or "torch" (each chosen expert dequantized on its own)
    int4_experts: str = "torch"
    norms_in_products: bool = False  # one row under --tp: each RMSNorm inside the product that reads it
    all_reduce: str = "none"  # "none" (one process), "lamport", "symmetric" (torch's one-shot) or "c10d"
    compile_decode: bool = False  # decode compiled by torch.compile and replayed as CUDA graphs
    # without compile_decode, on one GPU: the eager step captured in CUDA graphs (decode.GraphedStep)
    decode_graphs: bool = False
    # continuous batching's decode step over every row captured in CUDA graphs per cache bucket (decode.GraphedRows;
    # one GPU): 1.9-2.4x the eager step's end-to-end tokens/s at batch 32 and 64 on an H100 (docs/performance-log.md)
    batch_graphs: bool = False

    def __post_init__(self) -> None:
        for field, allowed in _CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"plan {field}={getattr(self, field)} is not one of {', '.join(allowed)}")
        if self.norms_in_products and self.gemv != "triton":
            raise ValueError("plan norms_in_products needs gemv=triton")

    def describe(self) -> str:
        """One line for --verbose."""
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
        return "kernel plan: " + " ".join(parts)

    def with_overrides(self, overrides: dict[str, str], device: torch.device) -> "KernelPlan":
        """This plan with some fields replaced from strings (the benchmark's --plan KEY=VALUE), for a model on
        `device`; ValueError for an unknown field or value, or a kernel that cannot run there."""
        values: dict[str, object] = {}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for key, value in overrides.items():
            if key not in fields:
                raise ValueError(f"unknown plan field '{key}': use one of {', '.join(fields)}")
            if fields[key].type in ("bool", bool):
                if value not in ("0", "1", "true", "false"):
                    raise ValueError(f"plan {key} takes 0/1 or true/false, not '{value}'")
                values[key] = value in ("1", "true")
            else:
                values[key] = value
        if values.get("gemv") == "torch" and "norms_in_products" not in values:
            values["norms_in_products"] = False  # it needs the GEMV kernel: follow the asked product
        plan = dataclasses.replace(self, **values)
        kernels = plan.fused or "triton" in (plan.attention, plan.gemv, plan.int8, plan.int4, plan.moe,
                                             plan.int4_experts)
        if plan.int8 == "packed" and (device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int8pack_mm")):
            raise ValueError(f"plan int8=packed runs on the CPU only, with torch's int8 weight matmul, not on {device} "
                             f"with torch {torch.__version__}")
        if plan.int4 == "packed" and (device.type != "cpu" or not packed_matmul_available()):
            raise ValueError(f"plan int4=packed runs on the CPU only, with torch's packed int4 matmul (torch >= "
                             f"2.6), not on {device} with torch {torch.__version__}")
        if plan.batch_graphs and device.type != "cuda":
            raise ValueError(f"plan batch_graphs needs a CUDA GPU, not {device}")
        if kernels and not kernels_allowed(device):
            raise ValueError(f"the plan's Triton kernels cannot run on {device}: they need a CUDA GPU with Triton "
                             f"(or TRITON_INTERPRET=1 on the CPU), and {KERNELS_ENV} not set to 0")
        return plan


def kernels_allowed(device: torch.device) -> bool:
    """Whether the engine's Triton kernels may run on `device`: CUDA with Triton (or the CPU under Triton's
    interpreter, TRITON_INTERPRET=1, as the tests run them), unless MISTRAL_CHAT_KERNELS=0."""
    if os.environ.get(KERNELS_ENV, "1") == "0" or triton is None:
        return False
    return device.type == "cuda" or INTERPRETED


def choose_plan(device: torch.device, dtype: torch.dtype, world: int = 1, quantize: str | None = None,
                compile: bool = False) -> KernelPlan:
    """The plan for a model of `dtype` on `device` (each rank's GPU under --tp) over `world` processes."""
    kernels = kernels_allowed(device)
    tp = world > 1
    cuda = device.type == "cuda"
    rows = "triton" if kernels and (tp or cuda) else "torch"
    if not tp:
        all_reduce = "none"
    elif cuda and kernels and dtype == torch.bfloat16:
        all_reduce = "lamport"
    elif cuda and kernels and dtype == torch.float32:
        all_reduce = "symmetric"
    else:
        all_reduce = "c10d"
    return KernelPlan(
        fused=kernels,
        attention="triton" if kernels else "torch",
        gemv=rows,
        int8=_int8_choice(device, dtype, kernels),
        int4=_int4_choice(device, dtype, kernels),
        moe=rows,
        int4_experts="triton" if kernels else "torch",
        norms_in_products=rows == "triton" and quantize is None,
        all_reduce=all_reduce,
        compile_decode=compile and cuda and tp,
        decode_graphs=cuda and not tp,
        batch_graphs=cuda and not tp,
    )


def _int8_choice(device: torch.device, dtype: torch.dtype, kernels: bool) -> str:
    """The int8 kernel where Triton runs; on the CPU with bf16, torch's int8 weight matmul where this torch has it
    (Mistral-7B's w13 on a 2-core Xeon: 26 GB/s against 1.7 dequantizing first)."""
    if kernels:
        return "triton"
    if device.type == "cpu" and dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return "packed"
    return "torch"


def _int4_choice(device: torch.device, dtype: torch.dtype, kernels: bool) -> str:
    """The int4 kernel where Triton runs; on the CPU with bf16, torch's packed int4 matmul where this torch has it
    (it reads the weights at ~19 GB/s on a 2-core Xeon, where dequantizing first runs at a small fraction of that;
    with float32 activations it is slow, so float32 dequantizes)."""
    if kernels:
        return "triton"
    if device.type == "cpu" and dtype == torch.bfloat16 and packed_matmul_available():
        return "packed"
    return "torch"
