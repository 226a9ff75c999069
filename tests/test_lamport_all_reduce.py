"""The Lamport all-reduce (engine/lamport_all_reduce.py) on the CPU: its Triton kernel runs in Triton's
interpreter, in 2 and 3 processes whose buffers are shared memory (on GPUs they are symmetric memory reached over
NVLink). Through tensor parallelism's own route (`parallel.all_reduce` and its custom op), eager and under
torch.compile, every rank gets the sum of every rank's input, the same bits on each, over many calls of mixed
sizes (the buffer generations rotate and are cleared as they go), also where the GEMV kernel (or Mixtral's experts'
kernel) pushes a product's outputs into the buffers itself. (On GPUs: benchmarks/gpu/lamport_all_reduce.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

CAPACITY = 256  # elements per slot: small, so that the interpreter is quick
BLOCK = 64
SIZES = [100, 256, 7, 64, 200, 3, 256, 256, 5, 130, 64, 1]
RESIDUAL_SIZES = [100, 256]  # then calls that add the residual and weigh by a norm's weight
SEND_SHAPES = [(200, 48), (64, 40)]  # then products (rows, columns) that push their outputs into the buffers
EXPERTS_SHAPES = [(130, 40)]  # then Mixtral's chosen experts' w2 (dim, hidden; 2 of 3 experts) pushing theirs


def _rank(rank: int, world: int, buffers: list[torch.Tensor], results) -> None:
    """One rank (a spawned process, TRITON_INTERPRET=1 inherited): all-reduces through parallel's route."""
    from mistral_chat.engine.parallel import collectives as parallel
    from mistral_chat.engine.kernels.lamport_all_reduce import LamportAllReduce

    torch.set_num_threads(1)
    parallel._fast_kernel = LamportAllReduce([b.data_ptr() for b in buffers], rank, CAPACITY, torch.device("cpu"),
                                             block=BLOCK)
    parallel._fast_buffer = buffers[rank]
    parallel._fast_route = ("cpu-test", torch.bfloat16, CAPACITY)
    from mistral_chat.engine.parallel.sharding import Parallel

    par = Parallel(rank=rank, world=world)
    compiled = torch.compile(lambda x: parallel.all_reduce(x * 2, par) * 0.5, fullgraph=True)  # exact scalings
    gen = torch.Generator().manual_seed(0)  # the same inputs on every rank: rank r's are inputs[r]
    inputs = [[torch.randn(s, generator=gen).to(torch.bfloat16) for s in SIZES] for _ in range(world)]
    inputs[0][2][0] = -0.0  # the "empty" bit pattern as an input: sent as +0.0
    worst, outs, phases = 0.0, [], {}  # phases: the worst error after each part, to tell which one failed
    for i, x in enumerate(inputs[rank]):
        want = sum(inputs[r][i].float() for r in range(world))
        if i % 3 == 2:  # compiled: the op is opaque to torch.compile, inputs scaled inside the graph
            out = compiled(x).float()
        else:
            out = parallel.all_reduce(x, par).float()
        outs.append(out.tolist())
        one_step = want.abs().clamp(min=2 ** -126) * 2 ** -7  # one bf16 rounding step
        worst = max(worst, float(((out - want).abs() / one_step).max()))
    phases["plain"] = worst
    for i, n in enumerate(RESIDUAL_SIZES):  # the residual add and the next norm's weight in the kernel's last step
        parts = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(world)]
        residual, weight = torch.randn(n, generator=gen).to(torch.bfloat16), torch.rand(n, generator=gen) + 0.5
        h, weighted = parallel.all_reduce_residual(parts[rank], residual, weight.to(torch.bfloat16), par)
        total = sum(p.float() for p in parts)
        want = residual.float() + total  # two roundings: of the sum, then of the add
        scale = (residual.float().abs() + total.abs()).clamp(min=2 ** -126) * 2 ** -6
        worst = max(worst, float(((h.float() - want).abs() / scale).max()))
        want = h.float() * weight.to(torch.bfloat16).float()
        worst = max(worst, float(((weighted.float() - want).abs() / (want.abs().clamp(min=2 ** -126) * 2 ** -7)).max()))
        outs.append(h.tolist() + weighted.tolist())
    phases["residual"] = worst
    # the product's kernel pushing its outputs into the buffers (what the model's products before an all-reduce do
    # where the Lamport kernel carries them), against the product, then the all-reduce: the same bits
    from mistral_chat.engine.kernels import experts_gemv, gemv

    same = True

    def sent_and_plain(name: str, send, product, partials: list[torch.Tensor], residual: torch.Tensor,
                       weight: torch.Tensor) -> None:
        nonlocal same, worst
        sent = send()
        plain = parallel.all_reduce_residual(product().view(residual.shape), residual, weight, par)
        same = same and all(torch.equal(a, b) for a, b in zip(sent, plain))
        partials = [p.float().flatten() for p in partials]
        want = residual.float().flatten() + sum(partials)
        scale = (residual.float().abs().flatten() + sum(p.abs() for p in partials)) * 2 ** -6  # three bf16 roundings
        worst = max(worst, float(((sent[0].detach().float().flatten() - want).abs() / scale).max()))
        phases[name] = (worst, [torch.equal(a, b) for a, b in zip(sent, plain)])
        outs.append(sent[0].flatten().tolist())

    for n, k in SEND_SHAPES:
        weights = [torch.randn(n, k, generator=gen).to(torch.bfloat16) for _ in range(world)]
        xs = [torch.randn(1, 1, k, generator=gen).to(torch.bfloat16) for _ in range(world)]
        residual = torch.randn(1, 1, n, generator=gen).to(torch.bfloat16)
        weight = (torch.rand(n, generator=gen) + 0.5).to(torch.bfloat16)
        linear = gemv.Linear(k, n, bias=False)
        linear.weight.data, linear.row_kernel = weights[rank], True
        sent_and_plain(f"send {n}x{k}", lambda: parallel.linear_all_reduce_residual(xs[rank], linear, residual,
                                                                                    weight, par),
                       lambda: linear(xs[rank]),
                       [F.linear(xs[r].float(), weights[r].float()) for r in range(world)], residual, weight)
    for n, k in EXPERTS_SHAPES:
        w2s = [torch.randn(3, n, k, generator=gen).to(torch.bfloat16) for _ in range(world)]
        acts = [torch.randn(2, k, generator=gen).to(torch.bfloat16) for _ in range(world)]
        experts, routing = torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.3]]).to(torch.bfloat16)  # the same on all
        residual = torch.randn(1, 1, n, generator=gen).to(torch.bfloat16)
        weight = (torch.rand(n, generator=gen) + 0.5).to(torch.bfloat16)
        sent_and_plain(f"experts {n}x{k}", lambda: parallel.experts_all_reduce_residual(
                           acts[rank], w2s[rank], experts, routing, residual, weight, par),
                       lambda: experts_gemv.experts_down(acts[rank], w2s[rank], experts, routing),
                       [experts_gemv.experts_down(acts[r], w2s[r], experts, routing) for r in range(world)], residual,
                       weight)
    results.put((rank, worst, outs, parallel._fast_kernel.counters.tolist(), same, phases))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_lamport_all_reduce_sums_across_processes(monkeypatch, world):
    import torch.multiprocessing as mp

    from mistral_chat.engine.kernels.lamport_all_reduce import EMPTY, buffer_slots

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the spawned ranks import the kernel
    ctx = mp.get_context("spawn")
    buffers = [torch.full((buffer_slots(world, CAPACITY),), EMPTY, dtype=torch.int16).share_memory_()
               for _ in range(world)]
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, buffers, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = sorted((results.get(timeout=300) for _ in range(world)), key=lambda g: g[0])
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    # within one bf16 rounding of the float32 sum (two with a residual)
    assert max(g[1] for g in got) <= 1.0, [(g[0], g[5]) for g in got]
    assert all(g[2] == got[0][2] for g in got)  # the same bits on every rank
    assert all(g[4] for g in got)  # products pushed into the buffers sum to the same bits as products then sent
    # each program's generation moved on once per call that used it, on every rank
    sizes = SIZES + RESIDUAL_SIZES + [n for n, _ in SEND_SHAPES + EXPERTS_SHAPES for _ in range(2)]
    calls_per_program = [sum(1 for n in sizes if n > p * BLOCK) for p in range(CAPACITY // BLOCK)]
    assert all(g[3] == [c % 3 for c in calls_per_program] for g in got)


def test_the_plans_all_reduce_kernel_is_set_up_only_on_gpus(monkeypatch):
    """enable_fast_all_reduce takes the plan's kernel: one process has none to set up, c10d carries a group's
    all-reduces off the GPU (and wherever the plan names no symmetric-memory kernel); fast_all_reduce_kernel names
    the kernel on the route (None: c10d)."""
    from mistral_chat.engine.parallel import collectives
    from mistral_chat.engine.parallel.sharding import Parallel

    one, two = Parallel(), Parallel(rank=0, world=2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert collectives.enable_fast_all_reduce(one, cpu, torch.bfloat16, "none") == "none"
    assert collectives.enable_fast_all_reduce(one, cuda, torch.bfloat16, "lamport") == "none"
    for kernel in ("lamport", "symmetric", "c10d"):
        assert collectives.enable_fast_all_reduce(two, cpu, torch.bfloat16, kernel) == "c10d"
    assert collectives.enable_fast_all_reduce(two, cuda, torch.bfloat16, "c10d") == "c10d"
    assert collectives.fast_all_reduce_kernel() is None
    monkeypatch.setattr(collectives, "_fast_route", ("group", torch.float32, 1024))
    assert collectives.fast_all_reduce_kernel() == "symmetric"  # torch's one-shot kernel
    monkeypatch.setattr(collectives, "_fast_kernel", object())
    assert collectives.fast_all_reduce_kernel() == "lamport"


def test_the_kernel_compiles_for_hopper():
    """Compiled for an H100 (sm_90) with Triton's own ptxas, as the GPU would (volatile spins, pointers read from
    memory), with programmatic dependent launch's wait (fused.pdl) before its first read; also the variant that
    only sums what the products pushed (SENT)."""
    from tiny_models import compile_for_hopper

    from mistral_chat.engine.kernels import lamport_all_reduce

    signature = {"x_ptr": "*bf16", "out_ptr": "*bf16", "buffers_ptr": "*i64", "counters_ptr": "*i32", "n": "i32",
                 "capacity": "i32", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "weighted_ptr": "*bf16"}
    for residual, sent in ((False, False), (True, False), (True, True)):
        kernel = compile_for_hopper(lamport_all_reduce._lamport_all_reduce_kernel, signature, {
            "RANK": 1, "WORLD": 2, "BLOCK": lamport_all_reduce.BLOCK, "RESIDUAL": residual, "SENT": sent,
            "PDL": True})
        ptx = kernel.asm["ptx"]
        assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")
