"""AutoAWQ 4-bit checkpoints (`quant_method: awq`, version gemm, group 128, zero point), loaded into the engine's
own int4 format (int4.py) as if `--quantize int4` had quantized them: the codes, scales and zeros come from the
files instead.

AWQ's layout: `qweight` int32 [in, out / 8] and `qzeros` int32 [in / 128, out / 8], eight 4-bit values a word
along the *output* dimension, output column 8j + ORDER[i] in bits 4i..4i+3 of word j; `scales` fp16 [in / 128,
out]; w[in, out] = (q - z) * s. Ours: [out, in] codes with a scale and a low (= -z * s) per group of 128 inputs.

`AwqReader` hands `checkpoint_state` each projection as one float32 tensor of rows [out, in + 2 * in / 128]: the
codes, then the groups' scales, then their lows, side by side. Every row operation the loader does (undoing HF's
rotate-half order of q/k, fusing q/k/v and w1/w3, stacking experts) so moves all three together; `prepare_awq`'s
conversion then splits them into the int4 buffers, rounding scale and low to the model dtype once. AutoAWQ keeps
`lm_head` in fp16: the output projection stays in the model dtype.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import torch

from mistral_chat.engine import int4
from mistral_chat.engine.weights import CheckpointReader, Convert, plain_convert
from mistral_chat.errors import MistralChatError, ModelFilesError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

GROUP = 128
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's order of the eight output columns in a word, lowest nibble first
_UNPACK = [ORDER.index(i) for i in range(8)]  # the nibble holding column i of a word
_PROJECTION = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|experts\.\d+\.w[123])\.weight$")


def check_load(name: str, quantize: str | None, tensor_parallel: bool, lora: bool) -> str:
    """The quantization an AWQ checkpoint loads with ("int4"), or a one-line error for what cannot combine."""
    if quantize not in (None, "int4"):
        raise MistralChatError(f"{name} is already quantized (4-bit AWQ): it loads as int4, --quantize "
                               f"{quantize} does not apply; drop --quantize or use the model's bf16 release")
    if tensor_parallel:
        raise MistralChatError(f"{name} is a 4-bit AWQ checkpoint, which loads on one device only: drop --tp, or "
                               "use the model's bf16 release with --tp (and --quantize int4 or int8)")
    if lora:
        raise MistralChatError(f"{name} is a 4-bit AWQ checkpoint: a LoRA adapter cannot be merged into its "
                               "weights; use the model's bf16 release with --lora")
    return "int4"


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """AWQ's int32 words [r, c / 8] -> the 4-bit values [r, c] (uint8) in column order."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed[..., None].to(torch.int32) >> shifts) & 15  # [r, c / 8, 8], nibble i
    return nibbles[..., _UNPACK].flatten(-2).to(torch.uint8)


def awq_rows(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One AWQ projection as float32 rows [out, in + 2 * in / GROUP]: codes, scales, lows (= -z * s, exact in
    float32: a 4-bit integer times an fp16 value)."""
    codes = unpack_columns(qweight).t().float()
    zeros = unpack_columns(qzeros).t().float()
    s = scales.t().float()
    return torch.cat([codes, s, -zeros * s], dim=1)


def quantized_rows(w: torch.Tensor) -> torch.Tensor:
    """A projection AWQ left unquantized (`modules_to_not_convert`) in the same rows, quantized as --quantize int4
    does (from float32)."""
    codes, scale, low = int4.quantize_groups(w.float(), GROUP)
    return torch.cat([codes.float(), scale, low], dim=1)


class AwqReader:
    """A CheckpointReader whose projections (`<name>.weight`) come from their `qweight`, `qzeros` and `scales`
    as `awq_rows`; other tensors read as stored. Whole tensors only (no --tp)."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self.format = reader.format
        self.index = reader.index
        self.model_dir = reader.model_dir

    def read(self, name: str, shape: tuple[int, ...], rows: slice | None = None,
             cols: slice | None = None) -> torch.Tensor:
        if not _PROJECTION.search(name):
            return self.reader.read(name, shape, rows, cols)
        assert rows is None and cols is None, "AWQ checkpoints load whole tensors"
        out, k = shape
        base = name.removesuffix(".weight")
        if base + ".qweight" not in self.index:
            if name in self.index:
                log.info("%s is not quantized in the checkpoint: quantizing it to int4", name)
                return quantized_rows(self.reader.read(name, shape))
            raise ModelFilesError(f"tensor '{base}.qweight' is missing from {self.model_dir}: the AWQ checkpoint "
                                  "is incomplete, re-download the model")
        if k % GROUP or out % 8:
            raise ModelFilesError(f"'{base}' is [{out}, {k}]: an AWQ projection needs an input size that is a "
                                  f"multiple of {GROUP} and an output size that is a multiple of 8")
        qweight = self.reader.read(base + ".qweight", (k, out // 8))
        qzeros = self.reader.read(base + ".qzeros", (k // GROUP, out // 8))
        scales = self.reader.read(base + ".scales", (k // GROUP, out))
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or not scales.is_floating_point():
            raise ModelFilesError(f"'{base}' holds {qweight.dtype} / {qzeros.dtype} / {scales.dtype} for qweight "
                                  "/ qzeros / scales, not AWQ's int32 / int32 / fp16: re-download the model")
        return awq_rows(qweight, qzeros, scales)

    def close(self) -> None:
        self.reader.close()


def split_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`awq_rows`' (or stacked experts') codes [..., out, in] (uint8), scales and lows [..., out, in / GROUP]."""
    k = t.shape[-1] * GROUP // (GROUP + 2)
    g = k // GROUP
    return t[..., :k].to(torch.uint8), t[..., k:k + g], t[..., k + g:]


def prepare_awq(model: nn.Module, device: torch.device, dtype: torch.dtype) -> Convert:
    """Make a (meta-device) model's projections int4 as `--quantize int4` does (quant.prepare_int4, the model's
    plan), except the output projection (fp16 in AWQ files), and return the conversion that fills them from
    `AwqReader`'s rows."""
    from mistral_chat.engine.quant import int4_tensors, prepare_int4, quantize_rows

    output = model.output
    formats = prepare_int4(model, dtype)
    model.output = output
    formats.pop("output.weight", None)
    plain = plain_convert(device, dtype)

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        kind = formats.get(name)
        if kind is None:
            return plain(name, t)
        codes, scale, low = split_rows(t.to(device))
        scale, low = scale.to(dtype), low.to(dtype)
        prefix = name + "_" if not name.endswith(".weight") else name.removesuffix("weight")
        if kind == "int8":  # no int4 group fits (not for AWQ's own shapes): through the float weight
            q, row_scale = quantize_rows(int4.dequantize(int4.pack(codes), scale, low, dtype))
            return {name: q, prefix + "scale": row_scale}
        return int4_tensors(name, prefix, kind, codes, scale, low)

    return convert
