"""Keep an activation in its own buffer inside a compiled decode step.

With coordinate-descent tuning on (decode.py), inductor turns a batch-1 matrix product into a Triton reduction and
inlines the pointwise work that produced its input: every output row recomputes it. For `w2` that means
SiLU(gate) * up over the whole hidden vector once per row of `w2` (4096 times a layer for Mistral-7B), which slows
`w2`'s product well below the copy bandwidth (docs/engine.md). Storing costs one small kernel for SwiGLU's
activation where inductor's products run (bf16 on one GPU); the int8 and GEMV kernels compute it in `w13`'s last
step instead (gemv.Linear.swiglu). The norms' kernels write their outputs themselves.
"""

from __future__ import annotations

import torch


def materialize(x: torch.Tensor) -> torch.Tensor:
    """`x`, stored in a buffer of its own when traced by torch.compile; unchanged in eager mode."""
    if not torch.compiler.is_compiling():
        return x
    from torch._inductor import inductor_prims

    return inductor_prims.force_stride_order(x, x.stride())
