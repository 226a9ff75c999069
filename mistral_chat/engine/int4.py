"""Group-wise int4 weights (`--quantize int4`): the format, and the projection that runs on it.

Each row of a projection is cut into groups of GROUP columns along the input dimension (128, or 64 / 32 where 128
does not divide the input size); each group gets a scale and a low value (asymmetric): w ~ low + q * scale with q
in 0..15, both in the model dtype. Codes are packed two a byte along the input dimension, the even column in the
low nibble: [N, K] weights take [N, K / 2] bytes. A projection whose input size no group divides stays int8
(quant.py chooses per tensor), so any shape loads.

How a product runs (`Int4Linear`, the plan's `int4`):
- "triton": the weight in the kernel's layout (`tile`) where its shape takes it (`int4_gemv.tiles`); one activation
  row (batch-1 decode) through kernels/int4_gemv.py, which dequantizes in registers; more rows untile and
  dequantize the whole weight to the activations' dtype, then multiply (other shapes: as "torch");
- "packed" (CPU): torch's packed int4 matmul (`_weight_int4pack_mm_for_cpu`), its own weight layout made at load
  time, for weights of 16k rows; other shapes take "torch";
- "torch": dequantize, then multiply (inductor fuses both into one kernel in compiled decode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistral_chat.engine.kernels import fused, int4_gemv, quant_rows
from mistral_chat.engine.materialize import materialize

GROUP_SIZES = (128, 64, 32)  # the first that divides a projection's input size
LEVELS = 15  # codes 0..15
_ROWS_AT_ONCE = 4096  # rows quantized together (float32 copies of a whole Mixtral expert stack would not fit)


def group_size(k: int) -> int | None:
    """The group size for an input size k, or None: no int4 group divides it (the projection stays int8)."""
    return next((g for g in GROUP_SIZES if k % g == 0), None)


def packed_matmul_available() -> bool:
    """Whether this torch has the CPU's packed int4 matmul (torch >= 2.6)."""
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")


def packed_fits(n: int, k: int) -> bool:
    """Whether torch's packed CPU layout takes an [n, k] weight (it needs n a multiple of 16)."""
    return n % 16 == 0 and group_size(k) is not None


def quantize_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8 in 0..15, [..., N, K]), scales and lows ([..., N, K / group], w's dtype) of w. Computed in
    float32 from the scale and low as stored (rounded to w's dtype), so rounding them costs no extra error."""
    shape = w.shape
    rows = w.reshape(-1, shape[-1])
    codes = torch.empty(rows.shape, dtype=torch.uint8, device=w.device)
    scales = torch.empty(rows.shape[0], shape[-1] // group, dtype=w.dtype, device=w.device)
    lows = torch.empty_like(scales)
    for start in range(0, rows.shape[0], _ROWS_AT_ONCE):
        part = rows[start:start + _ROWS_AT_ONCE].float().unflatten(-1, (-1, group))
        lo, hi = part.amin(dim=-1), part.amax(dim=-1)
        scale = ((hi - lo) / LEVELS).clamp(min=1e-8).to(w.dtype)
        low = lo.to(w.dtype)
        q = torch.round((part - low.float()[..., None]) / scale.float()[..., None]).clamp(0, LEVELS)
        codes[start:start + _ROWS_AT_ONCE] = q.flatten(-2).to(torch.uint8)
        scales[start:start + _ROWS_AT_ONCE], lows[start:start + _ROWS_AT_ONCE] = scale, low
    return codes.view(shape), scales.view(*shape[:-1], -1), lows.view(*shape[:-1], -1)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte along the last dimension (even column in the low nibble): [..., K] -> [..., K / 2]."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The codes `pack` packed: [..., K / 2] uint8 -> [..., K] uint8."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight ([..., N, K], `dtype`) of packed codes ([..., N, K / 2]) with their groups' scales and lows,
    computed in float32 and rounded once, `_ROWS_AT_ONCE` rows at a time outside torch.compile (whose fused kernel
    holds no float32 copy): the float32 copies of the two experts a Mixtral token chooses would take ~3 GB at once
    (full Mixtral int4 peaked at 30.5 GB in use on an H100 with them)."""
    rows = packed.reshape(-1, packed.shape[-1])
    if torch.compiler.is_compiling() or rows.shape[0] <= _ROWS_AT_ONCE:
        return _float_weight(packed, scale, low).to(dtype)
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=dtype, device=packed.device)
    n = rows.shape[0]
    flat_out, scales, lows = out.view(n, -1), scale.reshape(n, -1), low.reshape(n, -1)
    for start in range(0, n, _ROWS_AT_ONCE):
        part = slice(start, start + _ROWS_AT_ONCE)
        flat_out[part] = _float_weight(rows[part], scales[part], lows[part])
    return out


def _float_weight(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """`dequantize`'s float32 weight of packed codes ([..., N, K / 2]) with their groups' scales and lows."""
    codes = unpack(packed).unflatten(-1, (scale.shape[-1], -1)).float()
    return (codes * scale.float()[..., None] + low.float()[..., None]).flatten(-2)


def tile(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The int4 kernel's layout of packed codes ([..., N, K / 2]) and their scales and lows ([..., N, groups]),
    the same shapes. Rows come in blocks of 32 (row r * 8 + i of a block: r = 0..3, i = 0..7) and quads (16 bytes,
    32 codes) in blocks of 4 (quad b * 4 + j); a block's quad block b holds, for each r, the 32 quads (j, i) side
    by side: [N / 32, K / 128, 4, 4, 8, 16 bytes]. So a warp reads 512 contiguous bytes at a time, lane j * 8 + i
    taking row r * 8 + i and quad b * 4 + j (int4_gemv). Scales and lows: [N / 32, groups, 32], a group's 32 rows
    side by side."""
    *lead, n, half = packed.shape
    w = packed.reshape(*lead, n // 32, 4, 8, half // 64, 4, 16).permute(*range(len(lead)), -6, -3, -5, -2, -4, -1)
    return (w.reshape(packed.shape),
            *(t.reshape(*lead, n // 32, 32, -1).transpose(-2, -1).reshape(t.shape) for t in (scale, low)))


def untile(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tile`'s inverse: the codes, scales and lows row by row."""
    *lead, n, half = packed.shape
    w = packed.reshape(*lead, n // 32, half // 64, 4, 4, 8, 16).permute(*range(len(lead)), -6, -4, -2, -5, -3, -1)
    return (w.reshape(packed.shape),
            *(t.reshape(*lead, n // 32, -1, 32).transpose(-2, -1).reshape(t.shape) for t in (scale, low)))


def to_packed_layout(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's packed CPU layout of [N, K] codes: the weight, and its [K / group, N, 2] scales and zeros (torch
    dequantizes (q - 8) * scale + zero, so zero = low + 8 * scale)."""
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    zero = (low.float() + 8 * scale.float()).to(scale.dtype)
    return weight, torch.stack([scale.t(), zero.t()], dim=-1).contiguous()


@torch.library.custom_op("mistral_chat::int4_packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x ([..., K]) times a weight in torch's packed CPU layout (`to_packed_layout`) transposed. A custom op, so
    that torch.compile calls torch's kernel as it is (inductor's own lowering of it fails on torch 2.13)."""
    k, n = x.shape[-1], scales_and_zeros.shape[1]
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, k).contiguous(), weight, group, scales_and_zeros)
    return out.reshape(*x.shape[:-1], n)


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], scales_and_zeros.shape[1])


class Int4Linear(nn.Module):
    """A bias-free linear layer with a group-wise int4 weight. `layout`: "groups" (the packed codes with scales
    and lows row by row: dequantize, then multiply), "tiled" (the same in the kernels' layout, `tile`: int4_gemv
    for one row, quant_rows up to its MAX_ROWS, else untile and dequantize) or "packed" (torch's CPU layout)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 layout: str = "groups", fused: bool = False) -> None:
        super().__init__()
        group = group_size(in_features)
        assert group is not None, f"no int4 group divides {in_features}"
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.layout, self.fused = layout, fused
        groups = in_features // group
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        if layout == "packed":
            self.register_buffer("scales_and_zeros", torch.empty(groups, out_features, 2, dtype=dtype))
        else:
            self.register_buffer("scale", torch.empty(out_features, groups, dtype=dtype))
            self.register_buffer("low", torch.empty(out_features, groups, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "packed":
            return packed_linear(x, self.weight, self.scales_and_zeros, self.group)
        if self._kernel_takes(x):
            return int4_gemv.int4_linear(x, self.weight, self.scale, self.low)
        if self.layout == "tiled" and quant_rows.takes(x):
            return quant_rows.int4_rows_linear(x, self.weight, self.scale, self.low)
        return F.linear(x, self.dequantized(x.dtype))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight ([out, in], `dtype`) of a "groups" or "tiled" layout."""
        parts = (self.weight, self.scale, self.low)
        return dequantize(*(untile(*parts) if self.layout == "tiled" else parts), dtype)

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        """The kernel's layout and one activation row."""
        return self.layout == "tiled" and x.numel() == x.shape[-1]

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up for this gate/up projection of x: in the kernel's last step for a single row, else the
        product, then the activation (as quant.Int8Linear.swiglu)."""
        if self._kernel_takes(x):
            return int4_gemv.int4_linear(x, self.weight, self.scale, self.low, swiglu=True)
        return materialize(fused.silu_and_mul(self(x), self.fused))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group}, layout={self.layout}"
