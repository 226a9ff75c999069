"""The int4 GEMV kernel (engine/kernels/int4_gemv.py) on the CPU:

- its inline PTX pieces (kernels/int4_ptx.py), run by a model of their instructions (`run_ptx`, below): every
  code decodes exactly, the bf16 activations' pairs equal the float32 ones;
- the kernel under Triton's interpreter, both ways: the float32 path (what the interpreter runs in the product)
  equals the dequantized product to float32 rounding, and the GPU path (packed fp16, inline PTX run by the model)
  to fp16 rounding, in the tiled layout (int4.tile), every group size, bf16 and float32 activations, SwiGLU's
  last step and several configurations, the columns split over 1-8 programs a block (empty shares too);
- the GPU path compiled for an H100 (sm_90) with Triton's own ptxas: the packed instructions are in its PTX, and
  with PDL the first step's weights are asked of L2 before the wait.

The model of the PTX instructions (`run_ptx`): each acts on whole numpy arrays of 32-bit registers (uint32; .f16
registers hold their 16 bits), as the PTX ISA defines it: `mov`, `shl`, `shr.u32`, `and`; `lop3.b32` by its truth
table; `fma.rn.f16x2`, `add.rn.f16x2`, `mul.rn.f16x2` on each 16-bit half, rounded once to the nearest fp16 (ties
to even); `cvt.rn.f16x2.f32 d, a, b` putting a in the high half and b in the low half; `cvt.f32.f16`;
`mov.b32 {lo, hi}, r` splitting r into its halves. An instruction it has no model of raises.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tiny_models import run_interpreted

pytest.importorskip("triton")

MASK = 0xFFFFFFFF


def _halves(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The low and high fp16 halves of 32-bit registers, as float64."""
    r = r.astype(np.uint32)
    lo = (r & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    hi = (r >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
    return lo, hi


def _pack(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Two float64 arrays rounded to fp16 (nearest, ties to even) and packed: lo in the low half."""
    lo16 = np.asarray(lo, dtype=np.float64).astype(np.float16).view(np.uint16).astype(np.uint32)
    hi16 = np.asarray(hi, dtype=np.float64).astype(np.float16).view(np.uint16).astype(np.uint32)
    return lo16 | (hi16 << 16)


def _f32(r: np.ndarray) -> np.ndarray:
    """32-bit registers read as float32, as float64."""
    return np.asarray(r, dtype=np.uint32).view(np.float32).astype(np.float64)


def _lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, lut: int) -> np.ndarray:
    """Each result bit is bit (4 a + 2 b + c) of lut, for the matching bits of a, b and c."""
    out = np.zeros_like(a, dtype=np.uint32)
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out & MASK


def run_ptx(asm: str, constraints: str, args: list[np.ndarray]) -> list[np.ndarray]:
    """Run `asm` (an inline PTX block as tl.inline_asm_elementwise takes it) on args (arrays of one shape, of 4-byte
    elements: int32 for "r" operands, float32 for "f" ones); returns the outputs ($0...) as uint32 arrays of bits."""
    outputs = sum(kind.startswith("=") for kind in constraints.split(","))
    regs = {f"${outputs + i}": np.ascontiguousarray(a).view(np.uint32) for i, a in enumerate(args)}
    shape = np.shape(args[0])

    def value(operand: str) -> np.ndarray:
        if operand in regs:
            return regs[operand]
        number = int(operand, 16) if operand.lower().startswith("0x") else int(operand)
        return np.full(shape, number & MASK, dtype=np.uint32)

    for statement in _statements(asm):
        op, _, rest = statement.partition(" ")
        if op == ".reg":
            continue
        split = re.fullmatch(r"\{\s*(\S+)\s*,\s*(\S+)\s*\}\s*,\s*(\S+)", rest)
        if op == "mov.b32" and split:  # mov.b32 {lo, hi}, r: r's low and high halves
            lo, hi, src = split.groups()
            regs[lo], regs[hi] = value(src) & 0xFFFF, value(src) >> 16
            continue
        d, *ops = [o.strip() for o in rest.split(",")]
        v = [value(o) for o in ops]
        if op == "mov.b32":
            out = v[0]
        elif op == "shr.u32":
            out = v[0] >> v[1]
        elif op == "shl.b32":
            out = (v[0] << v[1]) & MASK
        elif op == "and.b32":
            out = v[0] & v[1]
        elif op == "lop3.b32":
            out = _lop3(v[0], v[1], v[2], int(v[3].flat[0]))
        elif op == "fma.rn.f16x2":
            (a0, a1), (b0, b1), (c0, c1) = _halves(v[0]), _halves(v[1]), _halves(v[2])
            out = _pack(a0 * b0 + c0, a1 * b1 + c1)
        elif op == "add.rn.f16x2":
            (a0, a1), (b0, b1) = _halves(v[0]), _halves(v[1])
            out = _pack(a0 + b0, a1 + b1)
        elif op == "mul.rn.f16x2":
            (a0, a1), (b0, b1) = _halves(v[0]), _halves(v[1])
            out = _pack(a0 * b0, a1 * b1)
        elif op == "cvt.rn.f16x2.f32":
            out = _pack(_f32(v[1]), _f32(v[0]))  # the first source goes into the high half
        elif op == "cvt.f32.f16":
            out = (v[0] & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
        else:
            raise NotImplementedError(f"no model of {op}")
        regs[d] = np.asarray(out, dtype=np.uint32) & MASK
    return [regs[f"${i}"] for i in range(outputs)]


def _statements(asm: str) -> list[str]:
    """The instructions of an inline PTX block, one a string with its whitespace normalised (the block's own braces
    dropped, a vector operand's kept)."""
    text = asm.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    return [" ".join(s.split()) for s in text.split(";") if s.strip()]


def install_ptx_model() -> None:
    """Make Triton's interpreter (TRITON_INTERPRET=1) run inline PTX through `run_ptx`, on its arguments' arrays
    broadcast to one shape."""
    import triton.language as tl
    from triton.runtime import interpreter

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        assert pack == 1, "the model runs one element an instance"
        arrays = [np.broadcast_to(v.data, np.broadcast_shapes(*(u.data.shape for u in values))) for v in values]
        outs = run_ptx(asm, constraints, arrays)
        handles = []
        for out, ty in zip(outs, types):
            scalar = ty.scalar if hasattr(ty, "scalar") else ty
            np_type = {tl.int32: np.int32, tl.float32: np.float32}[scalar]
            handles.append(interpreter.TensorHandle(out.astype(np.uint32).view(np_type), scalar))

        class Call:
            def get_result(self, i):
                return handles[i]

        return Call()

    interpreter.InterpreterBuilder.create_inline_asm = create_inline_asm


RNG = np.random.default_rng(0)
X_PAIRS = "=r,=r,=r,=r,=r" + ",f" * 8
X_PAIRS_BF16 = "=r,=r,=r,=r,=r" + ",r" * 4


def _words(codes: np.ndarray) -> np.ndarray:
    """int32 words of 8 codes ([..., 8], code j at bits 4j), as int4.pack lays them out."""
    return sum(codes[..., j].astype(np.uint32) << (4 * j) for j in range(8)).astype(np.uint32)


def test_every_code_decodes_exactly_at_every_position():
    from mistral_chat.engine.kernels import int4_ptx

    codes = np.array([[(q + j) % 16 for j in range(8)] for q in range(16)])  # each code at each position
    words = _words(codes)
    for j in range(8):  # x one-hot at column j: the sum is code j's value
        x = [np.full(16, float(i == j), dtype=np.float32) for i in range(8)]
        pairs = run_ptx(int4_ptx.X_PAIRS_ASM, X_PAIRS, x)
        out = run_ptx(int4_ptx.WORD_DOT_ASM, "=r" + ",r" * 6, [words, *pairs[:4], np.zeros(16, np.uint32)])[0]
        lo, hi = _halves(out)
        np.testing.assert_array_equal(lo if j < 4 else hi, (codes[:, j] - 8) / 32)
        np.testing.assert_array_equal(hi if j < 4 else lo, 0)
        assert np.array_equal(_halves(pairs[4])[j // 4], np.ones(16) / 32)  # the activations' sum / 32


def test_a_word_sums_its_products_and_the_pieces_agree():
    from mistral_chat.engine.kernels import int4_ptx

    codes = RNG.integers(0, 16, (500, 8))
    x = RNG.standard_normal((500, 8)).astype(np.float32)
    pairs = run_ptx(int4_ptx.X_PAIRS_ASM, X_PAIRS, list(x.T))
    acc = (np.float16(0.5).view(np.uint16).astype(np.uint32) * 0x10001) * np.ones(500, np.uint32)
    lo, hi = _halves(run_ptx(int4_ptx.WORD_DOT_ASM, "=r" + ",r" * 6, [_words(codes), *pairs[:4], acc])[0])
    x16 = x.astype(np.float16).astype(np.float64)
    want = (codes - 8) / 32 * x16
    np.testing.assert_allclose(lo, 0.5 + want[:, :4].sum(1), rtol=3e-3, atol=3e-3)
    np.testing.assert_allclose(hi, 0.5 + want[:, 4:].sum(1), rtol=3e-3, atol=3e-3)
    sum_lo, sum_hi = _halves(pairs[4])
    np.testing.assert_allclose(sum_lo, x16[:, :4].sum(1) / 32, rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(sum_hi, x16[:, 4:].sum(1) / 32, rtol=2e-3, atol=1e-3)
    # bf16 activations as read (two a word, even one low) give the pairs float32 ones do
    bf16 = (x.view(np.uint32) + 0x8000) >> 16  # rounded to bf16 bits (no NaN here)
    as_f32 = (bf16 << 16).view(np.float32)
    read = [bf16[:, 2 * i] | (bf16[:, 2 * i + 1] << 16) for i in range(4)]
    for a, b in zip(run_ptx(int4_ptx.X_PAIRS_BF16_ASM, X_PAIRS_BF16, read),
                    run_ptx(int4_ptx.X_PAIRS_ASM, X_PAIRS, list(as_f32.T))):
        np.testing.assert_array_equal(a, b)
    # widening and the pair add
    wlo, whi = run_ptx(int4_ptx.WIDEN_ASM, "=f,=f,r", [pairs[0]])
    np.testing.assert_array_equal(wlo.view(np.float32), _halves(pairs[0])[0].astype(np.float32))
    np.testing.assert_array_equal(whi.view(np.float32), _halves(pairs[0])[1].astype(np.float32))
    added = run_ptx(int4_ptx.HADD2_ASM, "=r,r,r", [pairs[0], pairs[1]])[0]
    np.testing.assert_array_equal(_halves(added)[0], (_halves(pairs[0])[0] + _halves(pairs[1])[0]).astype(
        np.float16).astype(np.float64))


KERNEL_CHECK = r"""
import sys
import torch
import torch.nn.functional as F
from mistral_chat.engine.int4 import dequantize, pack, quantize_groups, tile
from mistral_chat.engine.kernels import fused, int4_gemv

half2 = "half2" in sys.argv
if half2:  # the GPU path, its inline PTX run by the model of its instructions
    from test_int4_gemv import install_ptx_model
    install_ptx_model()
gen = torch.Generator().manual_seed(0)
configs = [{}] + [dict(U=u, WARPS=w, num_warps=w, SPLIT=split) for u, w, split in ((1, 1, 1), (4, 2, 1), (2, 4, 1),
                                                                                     (1, 1, 2), (1, 2, 4), (1, 1, 8))]
worst = 0.0
for n, k, group in ((64, 256, 128), (64, 128, 64), (128, 384, 32), (64, 1152, 64)):
    w = torch.randn(n, k, generator=gen) * 0.02
    codes, scale, low = quantize_groups(w, group)
    packed = pack(codes)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(k, generator=gen).to(dtype)
        want = F.linear(x.float(), dequantize(packed, scale, low, torch.float32))
        tiled = tile(packed, scale.to(dtype), low.to(dtype))
        for config in configs if dtype == torch.float32 and k < 1000 else configs[:1]:
            for parts in (1, 2) if config.get("SPLIT", 2) > 1 else (1,):
                out = torch.empty(n // parts, dtype=dtype)
                int4_gemv.launch(x, *tiled, out, parts, half2, **config)
                if dtype == torch.float32 and parts == 1:
                    rel = ((out - want).norm() / want.norm()).item()
                    assert rel < (3e-3 if half2 else 1e-6), (n, k, config, rel)  # fp16 sums / float32 rounding
                    worst = max(worst, rel)
                else:  # bf16 scales, lows and outputs, SiLU(gate) * up: the dequantized product rounded as such
                    full = F.linear(x.float(), dequantize(packed, scale.to(dtype), low.to(dtype), torch.float32))
                    ref = full.to(dtype) if parts == 1 else fused.silu_and_mul(full.to(dtype), kernel=True)
                    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    # the custom op (the autotuner's configuration, the interpreter's float32 path)
    xs = torch.randn(1, 1, k, generator=gen)
    got = int4_gemv.int4_linear(xs, *tile(packed, scale, low))
    assert got.shape == (1, 1, n), got.shape
    torch.testing.assert_close(got, F.linear(xs, dequantize(packed, scale, low, torch.float32)), rtol=1e-5, atol=1e-5)
    assert torch.equal(int4_gemv.int4_linear(xs, *tile(packed, scale, low), swiglu=True),
                       fused.silu_and_mul(got, kernel=True))
# the chosen experts of one token, read in place: each slot's product equals its expert's own
n, k, group, count = 64, 128, 32, 4
w = torch.randn(count, n, k, generator=gen) * 0.02
codes, scale, low = quantize_groups(w, group)
packed, scale, low = tile(pack(codes), scale, low)
experts = torch.tensor([2, 0, 2])
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(1, k, generator=gen).to(dtype)
    rows = torch.randn(3, k, generator=gen).to(dtype)
    s, lo = scale.to(dtype), low.to(dtype)
    for parts in (1, 2):
        for xs in (x, rows):
            got = torch.empty(3, n // parts, dtype=dtype)
            int4_gemv.launch(xs, packed, s, lo, got, parts, half2, experts=experts)
            for slot, e in enumerate(experts.tolist()):
                out = torch.empty(n // parts, dtype=dtype)
                int4_gemv.launch(xs[min(slot, len(xs) - 1)], packed[e], s[e], lo[e], out, parts, half2)
                assert torch.equal(got[slot], out), (dtype, parts, len(xs), slot)
            if not half2:  # the custom op (the interpreter's float32 path)
                assert torch.equal(int4_gemv.int4_experts(xs, packed, s, lo, experts, swiglu=parts == 2), got)
            split = torch.empty_like(got)  # each block's columns in 2 shares, added up by the last program
            int4_gemv.launch(xs, packed, s, lo, split, parts, half2, experts=experts, U=1, WARPS=1, num_warps=1,
                             SPLIT=2)
            torch.testing.assert_close(split, got, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
assert not int4_gemv._counts(torch.device("cpu")).any()  # each split launch set its counts back to 0
print("worst", worst)
print("ok")
"""


def test_the_float32_path_equals_the_dequantized_product():
    assert "ok" in run_interpreted(KERNEL_CHECK)


def test_the_gpu_path_equals_the_dequantized_product_to_fp16_rounding():
    assert "ok" in run_interpreted(KERNEL_CHECK, "half2")


def _compile(kernel, signature: dict[str, str], constexprs: dict, num_warps: int):
    """`tiny_models.compile_for_hopper`, with the integer and pointer arguments marked divisible by 16 as Triton's
    launcher marks them for Mistral's shapes (else the 128-bit loads of a real launch do not show)."""
    from tiny_models import compile_for_hopper

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in signature}
    try:
        source = ASTSource(fn=kernel, signature=signature | dict.fromkeys(constexprs, "constexpr"),
                           constexprs=constexprs, attrs=attrs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except RuntimeError as e:
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no ptxas here: {e}")
        raise
    except (TypeError, KeyError):  # another Triton's attrs: without them
        return compile_for_hopper(kernel, signature, constexprs, num_warps)


@pytest.mark.parametrize("x_type", ["bf16", "fp32"])
def test_the_gpu_path_compiles_for_hopper_with_packed_instructions(x_type):
    from mistral_chat.engine.kernels import int4_gemv

    signature = {"x_ptr": f"*{x_type}", "w_ptr": "*i32", "scale_ptr": f"*{x_type}", "low_ptr": f"*{x_type}",
                 "out_ptr": f"*{x_type}", "experts_ptr": "*i64", "partial_ptr": "*fp32", "count_ptr": "*i32",
                 "N": "i32", "QUADS": "i32", "GROUPS": "i32",
                 "UP": "i32", "stride_we": "i32", "stride_se": "i32", "stride_x": "i32", "SLOTS": "i32"}
    cases = [(2, 4, 1, 128, True, False, 1), (1, 8, 2, 128, True, False, 1), (4, 4, 1, 64, False, False, 1),
             (2, 8, 2, 128, False, True, 1), (1, 4, 1, 128, True, False, 4), (1, 4, 2, 128, True, False, 2)]
    for u, warps, parts, group, pdl, experts, split in cases if x_type == "bf16" else cases[:1]:
        kernel = _compile(int4_gemv._int4_gemv_kernel.fn, signature, {
            "GROUP": group, "U": u, "WARPS": warps, "SPLIT": split, "PARTS": parts, "EXPERTS": experts,
            "HALF2": True, "X_BF16": x_type == "bf16", "PDL": pdl}, warps)
        ptx = kernel.asm["ptx"]
        assert kernel.asm["cubin"]
        for instruction in ("lop3.b32", "fma.rn.f16x2", "cvt.rn.f16x2.f32", "cvt.f32.f16"):
            assert instruction in ptx, instruction
        # per word: one shift, four lop3, eight packed fp16 operations (the word's own 4 decodes and 4 products)
        assert ptx.count("fma.rn.f16x2") == 2 * ptx.count("lop3.b32")
        # per quad block a warp takes: a 128-bit load of each of a thread's 4 rows of each part, and its quad's
        # activations (four 128-bit loads of bf16, eight of float32) once for all of them
        assert ptx.count("ld.global.v4") == u * (4 * parts + (4 if x_type == "bf16" else 8)), ptx.count("ld.global.v4")
        if pdl:  # the first step's weights are asked of L2 before the wait for the previous kernel
            assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")
        if split > 1:  # one count a program, after a barrier; the last reads the partials from L2
            assert ptx.count("atom.global.gpu.acq_rel.add") == 1 and "bar.sync" in ptx, ptx
            assert ptx.count("ld.global.cg") >= 1
