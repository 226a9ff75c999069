"""Matrix-vector product for batch-1 decode with bf16 (or any float) weights, as one Triton kernel.

Batch-1 decode multiplies one activation row by each weight matrix, so a product takes as long as its weight
takes to stream from memory. Inductor's products reach ~96% of that on Mistral-7B's whole matrices but less on
small ones, such as the half matrices each GPU holds under tensor parallelism; this kernel streams the weight
in tiles of rows x columns, keeps per-lane partial sums through the loop, and loads each tile one step ahead.

`linear_row(x, weight)` is a torch custom op (opaque to torch.compile, captured whole by CUDA graphs). `Linear`
(the model's projections) sends a single activation row to it where the plan's `gemv` is "triton" (under tensor
parallelism, where the matrices are halved), and runs `F.linear` otherwise. `Linear.swiglu` gives SwiGLU's
activation of a gate/up projection, in the kernel's last step where the kernel runs. On H100 and H200 GPUs the
kernel's programs start while the kernel before it still runs (fused.pdl): they load their first weights, then
wait, and Mistral-7B's products take the configuration measured fastest as decode runs them (_HOPPER_CONFIGS;
other shapes and GPUs are autotuned). The tests run it on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistral_chat.engine.kernels import fused
from mistral_chat.engine.kernels.fused import AUTOTUNE_CACHE, INTERPRETED, capability_major, kernel_op, pdl
from mistral_chat.engine.materialize import materialize

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: F.linear runs
    triton = None


if triton is not None:
    from mistral_chat.engine.kernels.fused import start_next, wait_previous
    from mistral_chat.engine.kernels.lamport_all_reduce import push

    # rows x columns of bf16 per program and step, warps, pipelined stages: how many bytes stay in flight
    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=s)
                for n, k, warps, s in ((4, 512, 4, 1), (8, 256, 4, 1), (2, 1024, 4, 1), (8, 512, 4, 1),
                                       (4, 1024, 8, 1), (16, 256, 8, 1), (4, 256, 4, 2), (2, 512, 4, 2),
                                       (8, 512, 8, 2), (1, 2048, 4, 1))]
    if INTERPRETED:  # the interpreter is slow: one small configuration
        _CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)]

    # Mistral-7B's products, whole and as each of 2 ranks holds them, (outputs, K, PARTS) -> the configuration
    # fastest in CUDA graphs as decode runs them (benchmarks/gpu/gemv_configs.py on two H200s, 2026-11-28). On GPUs of
    # compute capability 9.0 they replace autotuning, which times one launch at a time: its picks there were
    # 0-1.3 us slower a product, and on 2 GPUs each process picked among near-equal ones differently.
    _HOPPER_CONFIGS = {shape: triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=s)
                       for shape, (n, k, warps, s) in {
                           (6144, 4096, 1): (8, 512, 4, 1), (4096, 4096, 1): (4, 512, 4, 1),
                           (14336, 4096, 2): (4, 512, 4, 1), (4096, 14336, 1): (2, 512, 4, 2),
                           (3072, 4096, 1): (2, 512, 4, 2), (4096, 2048, 1): (4, 512, 4, 1),
                           (7168, 4096, 2): (2, 512, 4, 2), (4096, 7168, 1): (2, 512, 4, 2)}.items()}

    @triton.autotune(configs=_CONFIGS, key=["N", "K", "PARTS"], **AUTOTUNE_CACHE)
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn, UP, norm_ptr, eps, buffers_ptr, counters_ptr,
                     capacity, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTS: tl.constexpr,
                     NORM: tl.constexpr, SEND: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                     SEND_BLOCK: tl.constexpr, NORM_BLOCK: tl.constexpr, PDL: tl.constexpr):
        """out[n] = sum_k w[n, k] * x[k], float32 sums, for w [N, K] with contiguous rows (PARTS=1).

        PARTS=2 (SwiGLU): w holds gate rows, then up rows from row UP; out[n] = SiLU(gate[n]) * up[n], each
        program multiplying both rows of its outputs, rounded as the plain formula rounds.
        NORM: the sums are scaled by 1 / rms(h) of h at norm_ptr ([K]), which each program computes first:
        with x = h * (the norm's weight), that is the product of RMSNorm(h), with no kernel of its own.
        SEND (PARTS=1, bf16): instead of storing out, each program pushes its outputs into every rank's Lamport
        all-reduce buffer (buffers_ptr, counters_ptr, capacity, RANK, WORLD, SEND_BLOCK: those of a
        LamportAllReduce), for its `receive` to sum; see `linear_row_to_peers`.
        PDL (fused.pdl): the first weights are loaded while the previous kernel may still run."""
        start_next(PDL)
        r = tl.arange(0, BLOCK_N * PARTS)
        units = tl.program_id(0) * BLOCK_N + r // PARTS
        rows = units + (r % PARTS) * UP  # PARTS=2: tile rows 2i and 2i + 1 are output i's gate and up rows
        row_ok = units[:, None] < N
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows[:, None] * stride_wn
        w = tl.load(w_rows + cols[None, :], mask=row_ok & (cols[None, :] < K), other=0.0)
        wait_previous(PDL)
        # after the first weights' load, which it overlaps
        scale = _norm_scale(norm_ptr, K, eps, BLOCK_K, NORM, NORM_BLOCK)
        sums = _row_sums(w, w_rows, row_ok, x_ptr, K, BLOCK_N * PARTS, BLOCK_K) * scale
        _sums_done(sums, out_ptr, N, buffers_ptr, counters_ptr, capacity, BLOCK_N, PARTS, SEND, RANK, WORLD,
                   SEND_BLOCK)

    @triton.jit
    def _row_sums(w, w_rows, row_ok, x_ptr, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
        """The float32 sums of each row at w_rows (ROWS rows, row_ok masking the missing ones) times x ([K]), given
        the first tile w (columns 0 to BLOCK_K) already loaded: each next tile is loaded one step ahead, and the
        sums are kept per lane through the loop, reduced across threads at the end. Shared with experts_gemv."""
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            ahead = k0 + BLOCK_K + cols
            w_next = tl.load(w_rows + ahead[None, :], mask=row_ok & (ahead[None, :] < K), other=0.0)
            acc += w.to(tl.float32) * x[None, :]
            w = w_next
        return tl.sum(acc, axis=1)

    @triton.jit
    def _sums_done(sums, out_ptr, N, buffers_ptr, counters_ptr, capacity, BLOCK_N: tl.constexpr,
                   PARTS: tl.constexpr, SEND: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                   SEND_BLOCK: tl.constexpr):
        """A program's finished row sums: pushed into every rank's Lamport buffer (SEND), or stored
        (`_store_rows`). Shared with experts_gemv."""
        if SEND:
            units = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            gen = tl.load(counters_ptr + units // SEND_BLOCK, mask=units < N, other=0)
            push(sums.to(tl.bfloat16), units, units < N, gen, buffers_ptr, capacity, RANK, WORLD)
        else:
            _store_rows(out_ptr, sums, tl.program_id(0) * BLOCK_N, N, BLOCK_N, PARTS)

    @triton.jit
    def _norm_scale(norm_ptr, K, eps, BLOCK_K: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr):
        """1 / rms(h) of h at norm_ptr ([K], 8 KB for Mistral-7B, read from L2) with NORM, else 1. Shared with
        experts_gemv."""
        if NORM and NORM_BLOCK > 0:  # h in one load (NORM_BLOCK >= K)
            h = tl.load(norm_ptr + tl.arange(0, NORM_BLOCK), mask=tl.arange(0, NORM_BLOCK) < K, other=0.0)
            return 1.0 / tl.sqrt(tl.sum(h.to(tl.float32) * h.to(tl.float32), axis=0) / K + eps)
        elif NORM:
            cols = tl.arange(0, BLOCK_K)
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                h = tl.load(norm_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                squares += h * h
            return 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        else:
            return 1.0

    @triton.jit
    def _store_rows(out_ptr, sums, first, N, BLOCK_N: tl.constexpr, PARTS: tl.constexpr):
        """Store the row sums of outputs first .. first + BLOCK_N - 1 (PARTS=2: gate and up interleaved, stored as
        SiLU(gate) * up; each rounded to out's dtype first, as the product and then SiLU round in the plain
        formula). Shared with int8_gemv, int4_gemv and experts_gemv."""
        units = first + tl.arange(0, BLOCK_N)
        dtype = out_ptr.dtype.element_ty
        if PARTS == 2:
            gate, up = tl.split(tl.reshape(sums.to(dtype).to(tl.float32), (BLOCK_N, 2)))
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            tl.store(out_ptr + units, (act * up).to(dtype), mask=units < N)
        else:
            tl.store(out_ptr + units, sums.to(dtype), mask=units < N)


@kernel_op("mistral_chat::linear_row")
def linear_row(x: torch.Tensor, weight: torch.Tensor, swiglu: bool = False, norm_of: torch.Tensor | None = None,
               eps: float = 0.0, float_out: bool = False) -> torch.Tensor:
    """x ([..., K], one row in all) times weight ([N, K], rows contiguous) transposed; with `swiglu`, weight holds
    gate rows then up rows and the result is SiLU(gate) * up ([..., N / 2]); with `norm_of` (h, [K]), the sums
    are divided by rms(h) (eps inside the root) first: RMSNorm(h)'s product when x = h * the norm's weight.
    `float_out`: the float32 sums are stored as they are instead of rounded to x's dtype (the logits)."""
    assert triton is not None, "linear_row needs Triton"
    k, n, parts = x.shape[-1], weight.shape[0], 2 if swiglu else 1
    x_row = x.reshape(k).contiguous()
    h_row = x_row if norm_of is None else norm_of.reshape(k).contiguous()
    out = torch.empty(n // parts, dtype=_out_dtype(x, weight, float_out), device=x.device)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n // parts, meta["BLOCK_N"]),)

    args = (x_row, weight, out, n // parts, k, weight.stride(0), n // parts, h_row, eps, out, out, 0)
    options = dict(PARTS=parts, NORM=norm_of is not None, SEND=False, RANK=0, WORLD=1, SEND_BLOCK=1,
                   NORM_BLOCK=_norm_block(k) if norm_of is not None else 0, **pdl(x))
    config = measured_config(x, n // parts, k, parts, weight.stride(0))
    if config is None:
        _gemv_kernel[grid](*args, **options)
    else:
        _gemv_kernel.fn[grid(config.kwargs)](*args, **options, **config.all_kwargs())
    return out.reshape(*x.shape[:-1], n // parts)


def _norm_block(k: int) -> int:
    """NORM_BLOCK: h read in one load of this many columns (K <= 8192), or 0: in a loop of BLOCK_K columns."""
    return triton.next_power_of_2(k) if k <= 8192 else 0


def measured_config(x: torch.Tensor, outputs: int, k: int, parts: int, stride: int) -> "triton.Config | None":
    """The configuration measured fastest for this product on x's GPU (_HOPPER_CONFIGS), or None: autotune."""
    if not x.is_cuda or INTERPRETED or stride != k:
        return None
    return _HOPPER_CONFIGS.get((outputs, k, parts)) if capability_major(x) == 9 else None


def linear_row_to_peers(x: torch.Tensor, weight: torch.Tensor, lamport) -> None:
    """x ([..., K], one row, bf16) times weight ([N, K], bf16, rows contiguous) transposed, its outputs pushed
    straight into every rank's buffer of `lamport` (a LamportAllReduce) instead of into a tensor, for
    `lamport.receive` to sum: the all-reduce's kernel then neither reads this rank's input nor sends it, and each
    program's outputs leave for the peers as soon as they are computed."""
    assert triton is not None, "linear_row_to_peers needs Triton"
    k, n = x.shape[-1], weight.shape[0]
    assert x.dtype == weight.dtype == torch.bfloat16 and n <= lamport.capacity
    x_row = x.reshape(k).contiguous()
    config = (measured_config(x, n, k, 1, weight.stride(0))
              or send_config(_gemv_kernel, (n, k, weight.stride(0)), lambda: linear_row(x, weight)))
    _gemv_kernel.fn[(triton.cdiv(n, config.kwargs["BLOCK_N"]),)](
        x_row, weight, x_row, n, k, weight.stride(0), n, x_row, 0.0, lamport.addresses, lamport.counters,
        lamport.capacity, PARTS=1, NORM=False, SEND=True, RANK=lamport.rank, WORLD=lamport.world,
        SEND_BLOCK=lamport.block, NORM_BLOCK=0, **config.all_kwargs(), **pdl(x))


def send_config(kernel, shape: tuple, plain) -> "triton.Config":
    """The configuration of autotuned `kernel` for a launch that pushes its outputs to the peers: such a launch is
    not autotuned itself (trying configurations would push each one's outputs to the peers, which may read any of
    them), so it takes the one tuned for the plain product of the same `shape`, running `plain()` once first."""
    key = (kernel.fn.__name__, *shape)
    config = _send_configs.get(key)
    if config is None:
        plain()
        config = _send_configs[key] = kernel.best_config
    return config


_send_configs: dict = {}  # (kernel name, *shape) -> the plain product's tuned triton.Config


@linear_row.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, swiglu: bool = False, norm_of: torch.Tensor | None = None,
      eps: float = 0.0, float_out: bool = False) -> torch.Tensor:
    n = weight.shape[0] // (2 if swiglu else 1)
    return x.new_empty(*x.shape[:-1], n, dtype=_out_dtype(x, weight, float_out))


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, float_out: bool) -> torch.dtype:
    return torch.float32 if float_out else torch.promote_types(x.dtype, weight.dtype)


def use_kernel(x: torch.Tensor, weight: torch.Tensor, planned: bool) -> bool:
    """Whether a product of x by weight goes to the kernel: the plan says so, one activation row, weight rows
    contiguous."""
    return planned and x.numel() == x.shape[-1] and weight.stride(-1) == 1


class NoInitOnMeta:
    """For nn.Linear / nn.Embedding subclasses: made on the meta device (the loader's skeleton, whose weights come
    from the checkpoint), no random init. On meta, init runs through torch._refs, whose first use imports
    torch._dynamo: seconds of every start-up (2.4 s of a first load on the H100 machine) for numbers nobody reads."""

    weight: torch.Tensor

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()  # type: ignore[misc]


class Linear(NoInitOnMeta, nn.Linear):
    """nn.Linear (no bias) whose single-row products run on the kernel where `row_kernel` (the plan's gemv, set by
    the model) says so; `fused`: the plan's fused, for SwiGLU's activation outside the kernel. `float_out` (the
    output projection): the kernel keeps its float32 sums, as inductor's product does when its float32 cast is
    fused in (logits not rounded to bf16, so no exact ties between tokens, and a tensor-parallel run's logits as
    close to one GPU's as the sums allow); F.linear still rounds to x's dtype."""

    row_kernel = False
    fused = False
    float_out = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_takes(x):
            return linear_row(x, self.weight, float_out=self.float_out)
        return F.linear(x, self.weight, self.bias)

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        return self.bias is None and use_kernel(x, self.weight, self.row_kernel)

    def swiglu(self, x: torch.Tensor, norm_of: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
        """SiLU(gate) * up for this gate/up projection ([w1; w3]) of x: in the kernel's last step where a single
        row goes to the kernel (no kernel of its own for the activation), else the product, then the activation
        (stored apart under torch.compile, see materialize.py). `norm_of`: as in `normed` (kernel only)."""
        if norm_of is not None:
            return linear_row(x, self.weight, swiglu=True, norm_of=norm_of, eps=eps)
        if self._kernel_takes(x):
            return linear_row(x, self.weight, swiglu=True)
        return materialize(fused.silu_and_mul(self(x), self.fused))

    def normed(self, x: torch.Tensor, norm_of: torch.Tensor, eps: float) -> torch.Tensor:
        """The product of RMSNorm(norm_of) given x = norm_of * the norm's weight, in the kernel (its programs
        compute the norm's scale themselves; see `Transformer.rows_fused`)."""
        return linear_row(x, self.weight, norm_of=norm_of, eps=eps, float_out=self.float_out)
