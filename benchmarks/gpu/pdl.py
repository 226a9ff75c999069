"""Manual GPU experiment (not collected by pytest): does programmatic dependent launch (PDL) hide a batch-1
product's start inside a CUDA graph, as decode would replay it?

Each timed pair is a small producer kernel that writes the activation x (one program, like RMSNorm at batch 1),
then a bf16 matrix-vector product of x. Variants:
  plain        both launched normally: the product starts after the producer has finished and flushed
  pdl          the product launched with PDL; it loads its first weight tile, then waits (griddepcontrol.wait)
               for the producer's writes; the producer does not signal, so the product may start only as the
               producer's programs exit
  pdl+trigger  as pdl, and the producer signals (griddepcontrol.launch_dependents) as it starts, so the
               product's programs can start and load weights while the producer still works
The producer spins for about SPIN cycles to stand in for a norm or an attention kernel. The weights come from
memory (one of enough copies to fill 400 MB per call). Each variant's last output is checked against the
product of the x its producer wrote: a product that read x before the producer's write would fail the check.
If pdl+trigger is no faster than plain, PDL does not survive graph capture here (or hides nothing), and the
engine's kernels need not try it (BENCHMARKS.md, seventh session: PDL on the products alone, after inductor's
kernels, saw no gain).

    python3 benchmarks/gpu/pdl.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int8_gemv import graph_time  # noqa: E402
from mistral_chat.bench.run import copy_bandwidth  # noqa: E402

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w2": (4096, 14336), "wqkv/2": (3072, 4096),
          "wo/2": (4096, 2048)}
SPIN = 2000  # producer busy cycles (~1 us at 1.98 GHz)


@triton.jit
def _producer(src_ptr, x_ptr, k, spin, TRIGGER: tl.constexpr, BLOCK: tl.constexpr):
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    start = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    now = start
    while now - start < spin:
        now = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    for k0 in range(0, k, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        tl.store(x_ptr + cols, tl.load(src_ptr + cols, mask=cols < k), mask=cols < k)


@triton.jit
def _gemv(x_ptr, w_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WAIT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None] * K
    w = tl.load(w_rows + cols[None, :], mask=rows[:, None] < N, other=0.0)  # the weights never change
    if WAIT:  # x is the producer's output
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k0 + cols).to(tl.float32)
        ahead = k0 + BLOCK_K + cols
        w_next = tl.load(w_rows + ahead[None, :], mask=(rows[:, None] < N) & (ahead[None, :] < K), other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        w = w_next
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=rows < N)


def main() -> None:
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; producer spins {SPIN} cycles")
    variants = {"plain": (False, False), "pdl": (True, False), "pdl+trigger": (True, True)}
    print(f"{'matrix':9} " + " ".join(f"{v:>17}" for v in variants))
    for name, (n, k) in SHAPES.items():
        copies = max(1, (400 << 20) // (2 * n * k))
        w = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        sources = [torch.randn(k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.zeros(k, device=device, dtype=torch.bfloat16)
        out = torch.empty(n, device=device, dtype=torch.bfloat16)
        cells = []
        for pdl, trigger in variants.values():
            def pair(i: int) -> None:
                _producer[(1,)](sources[i], x, k, SPIN, TRIGGER=trigger, BLOCK=1024, num_warps=4)
                _gemv[(triton.cdiv(n, 4),)](x, w[i], out, n, k, BLOCK_N=4, BLOCK_K=512, WAIT=pdl, num_warps=4,
                                           **({"launch_pdl": True} if pdl else {}))
            seconds = graph_time(pair, copies)
            last = (50 - 1) % copies  # graph_time's last call in its graph
            want = F.linear(sources[last].float()[None], w[last].float())[0]
            error = ((out.float() - want).abs().max() / want.abs().max()).item()
            cells.append(f"{seconds * 1e6:6.1f} us {'ok' if error < 1e-2 else 'WRONG'}")
        print(f"{name:9} " + " ".join(f"{c:>17}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
