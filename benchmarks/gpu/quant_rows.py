"""Manual GPU check of the int4 and int8 products for a few rows (engine/kernels/quant_rows.py; not collected by
pytest).

For each of Mistral-7B's products and 2 to 64 activation rows (a verify step of 1 + N drafts, a batch's decode
step), in CUDA graphs, each call reading another copy of the weight (from memory, not L2): the int4 and int8 rows
kernels, the paths they replace (convert the whole weight, then multiply), bf16 (cuBLAS) and, as the yardstick,
one row through the int4 and int8 GEMV kernels (a decode step's product). Each kernel's output is checked against
the dequantized product. A verify step of speculation pays where the rows kernel's time stays near one row's.

    python3 benchmarks/gpu/quant_rows.py
    python3 benchmarks/gpu/quant_rows.py --rows 2,5,9
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int4_check import GB, PRODUCTS, copies, graph_time, rel  # noqa: E402

from mistral_chat.engine import int4  # noqa: E402
from mistral_chat.engine.kernels import int4_gemv, int8_gemv, quant_rows  # noqa: E402
from mistral_chat.engine.quant import quantize_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="2,5,9,17,33,64")
    args = parser.parse_args()
    dev = torch.device("cuda")
    counts = [int(r) for r in args.rows.split(",")]
    print(f"{'product':8} {'rows':>4} {'split':>5} | {'int4 us':>8} {'GB/s':>6} {'deq us':>8} {'x 1 row':>7} | "
          f"{'int8 us':>8} {'GB/s':>6} {'deq us':>8} {'x 1 row':>7} | {'bf16 us':>8}  errors vs dequantized")
    for name, (n, k, _) in PRODUCTS.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        codes, scale, low = int4.quantize_groups(w, int4.group_size(k))
        packed = int4.pack(codes)
        del codes
        tiled = int4.tile(packed, scale, low)
        q8, s8 = quantize_rows(w)
        b4, b8 = (sum(t.numel() * t.element_size() for t in ts) for ts in (tiled, (q8, s8)))
        c4, p4, c8 = copies(b4, *tiled), copies(b4, packed, scale, low), copies(b8, q8, s8)
        w16 = copies(w.numel() * 2, w)
        one = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        one4 = graph_time(lambda i: int4_gemv.int4_linear(one, *c4[i]), len(c4))
        one8 = graph_time(lambda i: int8_gemv.int8_linear(one, *c8[i]), len(c8))
        for m in counts:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            e4 = rel(quant_rows.int4_rows_linear(x, *tiled),
                     F.linear(x.float(), int4.dequantize(packed, scale, low, torch.float32)))
            e8 = rel(quant_rows.int8_rows_linear(x, q8, s8), F.linear(x.float(), q8.float()) * s8.float())
            t4 = graph_time(lambda i: quant_rows.int4_rows_linear(x, *c4[i]), len(c4))
            d4 = graph_time(lambda i: F.linear(x, int4.dequantize(*p4[i], x.dtype)), len(p4))
            t8 = graph_time(lambda i: quant_rows.int8_rows_linear(x, *c8[i]), len(c8))
            d8 = graph_time(lambda i: F.linear(x, c8[i][0].to(x.dtype)) * c8[i][1], len(c8))
            t16 = graph_time(lambda i: F.linear(x, w16[i][0]), len(w16))
            split = quant_rows.split_k(n // 32 * -(-m // quant_rows.BLOCK_M), k // 128, dev)
            verdict = "ok" if max(e4, e8) < 3e-2 else "WRONG"
            print(f"{name:8} {m:4} {split:5} | {t4 * 1e6:8.1f} {b4 / t4 / GB:6.0f} {d4 * 1e6:8.1f} {t4 / one4:7.2f} | "
                  f"{t8 * 1e6:8.1f} {b8 / t8 / GB:6.0f} {d8 * 1e6:8.1f} {t8 / one8:7.2f} | {t16 * 1e6:8.1f}  "
                  f"int4 {e4:.1e} int8 {e8:.1e} {verdict}", flush=True)
        torch.cuda.empty_cache()
    for kernel in (quant_rows._int4_rows_kernel, quant_rows._int8_rows_kernel):
        print("configs chosen:", {str(k): str(v) for k, v in kernel.cache.items()})


if __name__ == "__main__":
    main()
