"""One int4 product launched alone, for Nsight Compute (not collected by pytest): where the kernel's time goes.

    ncu --kernel-name regex:_int4_gemv_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy --section LaunchStats python3 benchmarks/gpu/int4_profile.py

Mistral-7B's w13 (28672 x 4096, SwiGLU in the last step) by default, in one configuration of the kernel (no
autotuning, so the profiled launch is the product itself), in the kernel's tiled layout (int4.tile): `--rows 28672
--cols 4096 --swiglu --config 1,4,2` (U, WARPS, SPLIT[, maxnreg]).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
from mistral_chat.engine import int4  # noqa: E402
from mistral_chat.engine.kernels import int4_gemv  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=28672)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--swiglu", action="store_true", default=True)
    parser.add_argument("--no-swiglu", dest="swiglu", action="store_false")
    parser.add_argument("--config", default="1,4,2", help="U,WARPS,SPLIT[,maxnreg]")
    parser.add_argument("--launches", type=int, default=5)
    args = parser.parse_args()
    u, warps, split, *cap = (int(v) for v in args.config.split(","))
    w = torch.randn(args.rows, args.cols, device="cuda", dtype=torch.bfloat16) * 0.02
    codes, scale, low = int4.quantize_groups(w, int4.group_size(args.cols))
    tiled = int4.tile(int4.pack(codes), scale, low)
    x = torch.randn(args.cols, device="cuda", dtype=torch.bfloat16)
    parts = 2 if args.swiglu else 1
    out = torch.empty(args.rows // parts, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.launches):
        int4_gemv.launch(x, *tiled, out, parts, True, U=u, WARPS=warps, SPLIT=split, num_warps=warps, num_stages=1,
                         **({"maxnreg": cap[0]} if cap else {}))
    torch.cuda.synchronize()
    print("launched", args.launches, "times:", args.rows, "x", args.cols, "config", args.config)


if __name__ == "__main__":
    main()
