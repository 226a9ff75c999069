"""Weight-only quantization, applied while loading: `--quantize int8` here, `--quantize int4` (group-wise,
int4.py) through the same load-time conversion.

int8: each output row of a projection gets one scale (symmetric, per channel): w ≈ int8 * scale. The product runs in
the activations' dtype on the dequantized weight, except where the plan's `int8` is "triton": one activation row
(batch-1 decode) goes to a Triton kernel (int8_gemv.py) that reads the int8 weight once and scales the sums, and
2 to 64 rows (a verify step, a batch's decode step) to another (quant_rows.py).
int4: groups of 128 (64, 32) columns with a scale and a low value each (int4.py); a projection whose input size
no group divides stays int8 (`prepare_int4`). Norms, the gate and the embedding stay in the model dtype.
Weights are quantized one tensor at a time as they are read, so a model whose bf16 weights do not fit the device
(full Mixtral-8x7B on one 80 GB GPU) still loads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistral_chat.engine import int4
from mistral_chat.engine.kernels import fused, int4_gemv, int8_gemv, quant_rows
from mistral_chat.engine.materialize import materialize
from mistral_chat.engine.moe import MoEFeedForward
from mistral_chat.engine.weights import Convert

QUANT_MODES = ("int8", "int4")
_QUANTIZED_SUFFIXES = (".wqkv.weight", ".wo.weight", ".w13.weight", ".w2.weight", "output.weight",
                       "feed_forward.w13", "feed_forward.w2")


def packed_fits(k: int) -> bool:
    """Whether torch's CPU int8 matmul takes an input size k: on torch 2.13 with bf16 it computes wrong sums for
    input sizes that are not multiples of 16 (8, 24, 40) or crashes (100, 200); multiples of 16 were exact."""
    return k % 16 == 0


@torch.library.custom_op("mistral_chat::int8_packed_linear", mutates_args=())
def packed_int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ([..., K], bf16, CPU) times weight ([N, K] int8) transposed, scaled per output row, by torch's CPU int8
    matmul: it reads the weight at the memory's speed where dequantizing first wrote and read it again as bf16
    (Mistral-7B's w13 on a 2-core Xeon: 26 against 1.7 GB/s). A custom op, opaque to torch.compile."""
    k, n = x.shape[-1], weight.shape[0]
    out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, k).contiguous(), weight, scale.to(x.dtype))
    return out.reshape(*x.shape[:-1], n)


@packed_int8_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight and one scale per output row."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 kernel: bool = False, fused: bool = False, packed: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = kernel  # the plan's int8 == "triton"
        self.packed = packed and packed_fits(in_features)  # the plan's int8 == "packed": torch's CPU int8 matmul
        self.fused = fused  # the plan's fused: SwiGLU's activation in one kernel outside the int8 kernel
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_takes(x):
            return int8_gemv.int8_linear(x, self.weight, self.scale)
        if self.kernel and quant_rows.takes(x) and quant_rows.int8_fits(self.weight):
            return quant_rows.int8_rows_linear(x, self.weight, self.scale)
        if self.packed and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return packed_int8_linear(x, self.weight, self.scale)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        """The plan says so, one activation row, and a weight the kernel takes."""
        return self.kernel and x.numel() == x.shape[-1] and int8_gemv.fits(self.weight)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up for this gate/up projection of x: in the kernel's last step for a single row (as
        gemv.Linear.swiglu), else the product, then the activation."""
        if self._kernel_takes(x):
            return int8_gemv.int8_linear(x, self.weight, self.scale, swiglu=True)
        return materialize(fused.silu_and_mul(self(x), self.fused))


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and per-row scales (w's dtype) of w ([..., out, in]), computed in float32."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    q = torch.round(wf / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


def int8_convert(device: torch.device, dtype: torch.dtype) -> Convert:
    """Load-time conversion: projections become int8 + scales on `device`, the rest plain `dtype`."""

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        t = t.to(device=device, dtype=dtype)
        if not name.endswith(_QUANTIZED_SUFFIXES):
            return {name: t}
        q, scale = quantize_rows(t)
        if name.endswith(".weight"):
            return {name: q, name.removesuffix("weight") + "scale": scale}
        return {name: q, name + "_scale": scale}  # stacked MoE experts

    return convert


def prepare_int8(model: nn.Module, dtype: torch.dtype) -> None:
    """Swap the projections of a (meta-device) model for int8 ones before its weights are loaded; they take the
    model's plan (`model.plan`, a KernelPlan)."""
    plan = model.plan
    if plan.norms_in_products:
        raise ValueError("plan norms_in_products needs float weights: int8 products do not compute the norm")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "gate":
                setattr(module, child_name, Int8Linear(child.in_features, child.out_features, dtype,
                                                       kernel=plan.int8 == "triton", fused=plan.fused,
                                                       packed=plan.int8 == "packed"))
        if isinstance(module, MoEFeedForward):
            module.quantize_int8(dtype)


def prepare_int4(model: nn.Module, dtype: torch.dtype) -> dict[str, str]:
    """Swap the projections of a (meta-device) model for group-wise int4 ones (int4.Int4Linear) before its weights
    are loaded, per the model's plan (`int4`); a projection whose input size no int4 group divides becomes int8
    instead, and so do Mixtral experts unless both their sizes take groups. Returns each quantized tensor's name ->
    its format ("int4", "packed" or "int8"), for `int4_convert`."""
    plan = model.plan
    if plan.norms_in_products:
        raise ValueError("plan norms_in_products needs float weights: int4 products do not compute the norm")
    formats: dict[str, str] = {}
    for prefix, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child_name == "gate":
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            k, n = child.in_features, child.out_features
            if int4.group_size(k) is None:
                formats[name + ".weight"] = "int8"
                new: nn.Module = Int8Linear(k, n, dtype, kernel=plan.int8 == "triton", fused=plan.fused,
                                            packed=plan.int8 == "packed")
            else:
                if plan.int4 == "packed" and int4.packed_fits(n, k):
                    layout = "packed"
                elif plan.int4 == "triton" and int4_gemv.tiles(n, k):
                    layout = "tiled"
                else:
                    layout = "groups"
                formats[name + ".weight"] = layout
                new = int4.Int4Linear(k, n, dtype, layout=layout, fused=plan.fused)
            setattr(module, child_name, new)
        if isinstance(module, MoEFeedForward):
            experts_int4 = module.quantize_int4(dtype, tiled=plan.int4_experts == "triton")
            for weight in ("w13", "w2"):
                formats[f"{prefix}.{weight}"] = ("tiled" if module.int4_tiled else "groups") if experts_int4 else "int8"
    return formats


def int4_convert(device: torch.device, dtype: torch.dtype, formats: dict[str, str]) -> Convert:
    """Load-time conversion for `prepare_int4`'s model: each projection in its format, the rest plain `dtype`."""

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        t = t.to(device=device, dtype=dtype)
        kind = formats.get(name)
        stacked = not name.endswith(".weight")  # MoE experts: w13_scale, w13_low
        prefix = name + "_" if stacked else name.removesuffix("weight")
        if kind is None:
            return {name: t}
        if kind == "int8":
            q, scale = quantize_rows(t)
            return {name: q, prefix + "scale": scale}
        codes, scale, low = int4.quantize_groups(t, int4.group_size(t.shape[-1]))
        return int4_tensors(name, prefix, kind, codes, scale, low)

    return convert


def int4_tensors(name: str, prefix: str, layout: str, codes: torch.Tensor, scale: torch.Tensor,
                 low: torch.Tensor) -> dict[str, torch.Tensor]:
    """The buffers of an int4 weight `name` (codes, scales, lows) in `layout`: "groups", "tiled" (int4.tile, a
    stack of experts one at a time: no second copy of the whole stack) or "packed" (torch's CPU layout)."""
    if layout == "packed":
        weight, scales_and_zeros = int4.to_packed_layout(codes, scale, low)
        return {name: weight, prefix + "scales_and_zeros": scales_and_zeros}
    packed = int4.pack(codes)
    if layout == "tiled":
        for i in range(packed.shape[0]) if packed.dim() == 3 else (...,):
            packed[i], scale[i], low[i] = int4.tile(packed[i], scale[i], low[i])
    return {name: packed, prefix + "scale": scale, prefix + "low": low}
