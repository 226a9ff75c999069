"""int4 and int8 products for a few activation rows (engine/kernels/quant_rows.py): under Triton's interpreter
each equals the dequantized product, for each int4 group size, row counts that do not fill the 16-row blocks,
more than one block and columns split in parts; both compile for an H100 with tensor-core products; Int4Linear
and Int8Linear take them for 2 to MAX_ROWS rows (one row: the GEMV kernels; more: dequantized); and a model's
prefill and verify step of a few rows through them give the logits of its dequantized products."""

from __future__ import annotations

import pytest

from tiny_models import compile_for_hopper, run_interpreted

CHECK = r"""
import torch
import torch.nn.functional as F
from mistral_chat.engine import int4
from mistral_chat.engine.kernels import quant_rows
from mistral_chat.engine.quant import quantize_rows

cpu = torch.device("cpu")
assert quant_rows.split_k(2, 8, cpu) == 2 and quant_rows.split_k(2, 2, cpu) == 1
gen = torch.Generator().manual_seed(0)
# (rows, columns, int4 group, activation rows); the last: columns in 2 parts (split_k), summed after the kernel
for n, k, group, m in ((64, 256, 128, 2), (64, 128, 64, 5), (128, 256, 32, 17), (64, 384, 128, 64),
                       (64, 1024, 64, 3)):
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(1, m, k, generator=gen)
    codes, scale, low = int4.quantize_groups(w, group)
    packed = int4.pack(codes)
    got = quant_rows.int4_rows_linear(x, *int4.tile(packed, scale, low))
    want = F.linear(x, int4.dequantize(packed, scale, low, torch.float32))
    assert got.shape == (1, m, n) and got.dtype == x.dtype, (got.shape, got.dtype)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    q8, s8 = quantize_rows(w)
    got = quant_rows.int8_rows_linear(x, q8, s8)
    assert got.shape == (1, m, n), got.shape
    torch.testing.assert_close(got, F.linear(x, q8.float()) * s8, rtol=1e-5, atol=1e-4)
# half-precision activations: the weights made fp16 in registers, the products on the tensor cores on a GPU (the
# interpreter's bf16 conversions are not exact: fp16 stands for both)
w, x = torch.randn(64, 512, generator=gen), torch.randn(5, 512, generator=gen)
codes, scale, low = int4.quantize_groups(w, 128)
packed, q8, s8 = int4.pack(codes), *quantize_rows(w.half())
for got, want in ((quant_rows.int4_rows_linear(x.half(), *int4.tile(packed, scale.half(), low.half())),
                   F.linear(x, int4.dequantize(packed, scale.half(), low.half(), torch.float32))),
                  (quant_rows.int8_rows_linear(x.half(), q8, s8), F.linear(x, q8.float()) * s8.float())):
    assert got.dtype == torch.float16
    assert (got.float() - want).norm() / want.norm() < 2e-3
print("kernels ok")
if "layers" in __import__("sys").argv:
    from mistral_chat.engine.int4 import Int4Linear
    from mistral_chat.engine.quant import Int8Linear

    w = torch.randn(128, 256, generator=gen)
    layer4 = Int4Linear(256, 128, torch.float32, layout="tiled")
    codes, scale, low = int4.quantize_groups(w, 128)
    layer4.weight, layer4.scale, layer4.low = int4.tile(int4.pack(codes), scale, low)
    layer8 = Int8Linear(256, 128, torch.float32, kernel=True)
    layer8.weight, layer8.scale = quantize_rows(w)
    calls = []
    for name in ("int4_rows_linear", "int8_rows_linear"):
        real = getattr(quant_rows, name)
        setattr(quant_rows, name, lambda *a, real=real, name=name: calls.append((name, a[0].shape)) or real(*a))
    for rows in (1, 5, 64, 65):
        x = torch.randn(rows, 256, generator=gen)
        torch.testing.assert_close(layer4(x), F.linear(x, layer4.dequantized(torch.float32)), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer8(x), F.linear(x, layer8.weight.float()) * layer8.scale, rtol=1e-5,
                                   atol=1e-4)
    # one row: the GEMV kernels; past MAX_ROWS: dequantized
    assert calls == [(f"int{b}_rows_linear", (r, 256)) for r in (5, 64) for b in (4, 8)], calls
    print("layers ok")
"""


def test_the_kernels_equal_the_dequantized_products():
    assert "kernels ok" in run_interpreted(CHECK)


def test_quantized_layers_take_them_for_two_to_max_rows():
    assert "layers ok" in run_interpreted(CHECK, "layers")


MODEL = r"""
import torch
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.kernels import quant_rows
from tiny_models import count_calls, random_model

config = ModelConfig(dim=128, n_layers=1, head_dim=32, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=256,
                     sliding_window=16, max_seq_len=64)
tokens = torch.tensor([[1, 17, 99, 5, 230, 42, 8, 61]])
for quantize in ("int4", "int8"):
    model = random_model(config, quantize=quantize)  # the loader's plan here: the kernels (Triton's interpreter)
    plain = random_model(config, quantize=quantize, **{quantize: "torch"})  # dequantized products
    calls = count_calls(quant_rows, f"{quantize}_rows_linear")
    logits = []
    for m in (model, plain):
        m.setup_cache(64)
        with torch.no_grad():  # a 3-token prefill, then a verify step's 5 positions
            m(tokens[:, :3], 0)
            logits.append(m(tokens[:, 3:], 3, all_logits=True)[0])
    # wqkv, wo, w13 and w2 in the prefill (whose one last row's logits take the GEMV kernel), those and the output
    # in the verify step
    assert len(calls) == 4 + 5, len(calls)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
print("model ok")
"""


def test_a_models_steps_of_a_few_rows_take_them_and_equal_the_dequantized_ones():
    assert "model ok" in run_interpreted(MODEL)


@pytest.mark.parametrize("kind,x_type,group", [("int4", "bf16", 128), ("int4", "bf16", 32), ("int4", "fp32", 64),
                                               ("int8", "bf16", None)])
def test_they_compile_for_hopper_with_tensor_core_products(kind, x_type, group):
    from mistral_chat.engine.kernels import quant_rows

    sizes = {"M": "i32", "N": "i32", "K": "i32", "M_BLOCKS": "i32", "SPLIT": "i32"}
    if kind == "int4":
        kernel = quant_rows._int4_rows_kernel.fn
        signature = {"x_ptr": f"*{x_type}", "w_ptr": "*u8", "scale_ptr": f"*{x_type}", "low_ptr": f"*{x_type}",
                     "out_ptr": f"*{x_type}"} | sizes
        constexprs = {"GROUP": group, "BLOCK_M": 16, "IEEE": x_type == "fp32"}
    else:
        kernel = quant_rows._int8_rows_kernel.fn
        signature = {"x_ptr": f"*{x_type}", "w_ptr": "*i8", "scale_ptr": f"*{x_type}", "out_ptr": f"*{x_type}"} | sizes
        constexprs = {"BLOCK_M": 16, "IEEE": False}
    compiled = compile_for_hopper(kernel, signature, constexprs, num_warps=4)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"]
    if x_type == "bf16":  # float32 activations multiply in float32 (IEEE), not on the tensor cores
        assert "mma.sync" in ptx or "wgmma" in ptx
