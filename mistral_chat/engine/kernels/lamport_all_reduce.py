"""A barrier-free one-shot all-reduce for decode's small all-reduces, as one Triton kernel (GPUs over NVLink).

Each rank writes its input straight into a slot of every rank's buffer (symmetric memory: each rank can address
the others'), then spins until none of its own slots holds the "empty" bit pattern (-0.0 in bf16; a sender turns
its -0.0 into +0.0), and sums the slots in rank order, so every rank gets the same bits. No barrier, no flag:
the data is its own flag. Three buffer generations rotate, with a counter on the GPU per program (so CUDA graphs
replay it): after reading generation g a rank clears generation g - 1, which no peer can write again before this
rank has sent its next input (a peer must read that input first). TensorRT-LLM's "Lamport" all-reduce works
this way; torch's own one-shot kernel instead copies in, waits on every peer, sums and waits again.

`LamportAllReduce(addresses, rank, capacity, device)` holds one rank's state; every rank must make the same calls
with the same sizes, in the same order (as tensor-parallel decode does). bf16 only. On the CPU the kernel runs in
Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check it.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds may ship without Triton; then NCCL or torch's kernel is used
    triton = None

EMPTY = -32768  # the int16 bits of bf16 -0.0: what an unwritten slot holds
BLOCK = 1024  # elements per program


def buffer_slots(world: int, capacity: int) -> int:
    """int16 elements of each rank's buffer: 3 generations of one slot per rank, `capacity` elements each."""
    return 3 * world * capacity


if triton is not None:
    from mistral_chat.engine.kernels.fused import pdl, start_next, wait_previous

    _EMPTY = tl.constexpr(EMPTY)  # a compiled kernel may read module globals only as constexprs

    @triton.jit
    def push(values, offs, mask, gen, buffers_ptr, capacity, RANK: tl.constexpr, WORLD: tl.constexpr):
        """Write values (bf16) at offs into slot RANK of generation gen in every rank's buffer (buffers_ptr: their
        addresses), -0.0 as +0.0. Also called from the GEMV kernel's last step (gemv.linear_row_to_peers)."""
        bits = values.to(tl.bfloat16).to(tl.int16, bitcast=True)
        bits = tl.where(bits == _EMPTY, 0, bits)  # -0.0 would read as "not written yet": send +0.0
        for p in tl.static_range(WORLD):
            peer = tl.load(buffers_ptr + p).to(tl.pointer_type(tl.int16))
            tl.store(peer + (gen * WORLD + RANK) * capacity + offs, bits, mask=mask)

    @triton.jit
    def _lamport_all_reduce_kernel(x_ptr, out_ptr, buffers_ptr, counters_ptr, n, capacity, residual_ptr,
                                   weight_ptr, weighted_ptr, RANK: tl.constexpr, WORLD: tl.constexpr,
                                   BLOCK: tl.constexpr, RESIDUAL: tl.constexpr, SENT: tl.constexpr,
                                   PDL: tl.constexpr):
        """Sum of x (bf16, n elements) over WORLD ranks into out. buffers_ptr: [WORLD] int64 addresses of every
        rank's int16 buffer (buffer_slots elements, all EMPTY at first); counters_ptr: this rank's int32
        generation per program, all 0 at first. RESIDUAL: out = residual + the sum (rounded as the eager add),
        and weighted = out * weight (a norm's weight: see gemv.linear_row's norm_of). SENT: every rank's input is
        already in the buffers (`push`ed by the kernel that computed it); x is not read. PDL: see fused.pdl."""
        start_next(PDL)
        wait_previous(PDL)
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        gen = tl.load(counters_ptr + pid)
        if not SENT:  # this rank's slice into slot RANK of every rank's buffer
            push(tl.load(x_ptr + offs, mask=mask, other=0.0), offs, mask, gen, buffers_ptr, capacity, RANK, WORLD)
        own = tl.load(buffers_ptr + RANK).to(tl.pointer_type(tl.int16))
        acc = tl.zeros([BLOCK], tl.float32)
        for p in tl.static_range(WORLD):  # rank order: every rank adds the same values in the same order
            slot = own + (gen * WORLD + p) * capacity + offs
            got = tl.load(slot, mask=mask, other=0, volatile=True)
            while tl.max((got == _EMPTY).to(tl.int32), axis=0) > 0:
                got = tl.load(slot, mask=mask, other=0, volatile=True)
            acc += got.to(tl.bfloat16, bitcast=True).to(tl.float32)
        total = acc.to(tl.bfloat16)
        if RESIDUAL:
            residual = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            total = (residual + total.to(tl.float32)).to(tl.bfloat16)
            weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(weighted_ptr + offs, (total.to(tl.float32) * weight).to(tl.bfloat16), mask=mask)
        tl.store(out_ptr + offs, total, mask=mask)
        stale = (gen + 2) % 3  # the generation read last call: every peer has written it, none writes it next
        empty = tl.full([BLOCK], _EMPTY, tl.int16)
        for p in tl.static_range(WORLD):
            tl.store(own + (stale * WORLD + p) * capacity + pid * BLOCK + tl.arange(0, BLOCK), empty)
        tl.store(counters_ptr + pid, (gen + 1) % 3)


class LamportAllReduce:
    """One rank's side: the addresses of every rank's buffer (EMPTY-filled, `buffer_slots` int16 elements each,
    this rank's at index `rank`) and this rank's generation counters."""

    def __init__(self, addresses: list[int], rank: int, capacity: int, device: torch.device,
                 block: int = BLOCK) -> None:
        assert triton is not None, "the Lamport all-reduce needs Triton"
        assert capacity % block == 0, "capacity must be a whole number of blocks"
        self.rank, self.world, self.capacity, self.block = rank, len(addresses), capacity, block
        self.addresses = torch.tensor(addresses, dtype=torch.int64, device=device)
        self.counters = torch.zeros(capacity // block, dtype=torch.int32, device=device)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None, weighted: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of `x` (contiguous bf16, at most `capacity` elements) over the ranks, into `out` if given.
        With `residual`, `weight` and `weighted` (contiguous bf16 like x): residual + the sum, and that times
        weight into `weighted`."""
        n = x.numel()
        assert x.dtype == torch.bfloat16 and x.is_contiguous() and n <= self.capacity
        out = torch.empty_like(x) if out is None else out
        self._launch(x, n, out, residual, weight, weighted, sent=False)
        return out

    def receive(self, out: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                weighted: torch.Tensor) -> None:
        """As `__call__` with `residual`, `weight` and `weighted`, for inputs that every rank has already
        pushed into the buffers (gemv.linear_row_to_peers), out.numel() elements of them."""
        assert out.dtype == torch.bfloat16 and out.numel() <= self.capacity
        self._launch(out, out.numel(), out, residual, weight, weighted, sent=True)

    def _launch(self, x: torch.Tensor, n: int, out: torch.Tensor, residual: torch.Tensor | None,
                weight: torch.Tensor | None, weighted: torch.Tensor | None, sent: bool) -> None:
        add = residual is not None
        _lamport_all_reduce_kernel[(triton.cdiv(n, self.block),)](
            x, out, self.addresses, self.counters, n, self.capacity, residual if add else x, weight if add else x,
            weighted if add else out, RANK=self.rank, WORLD=self.world, BLOCK=self.block, RESIDUAL=add, SENT=sent,
            num_warps=4, **pdl(x))
