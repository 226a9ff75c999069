"""Manual multi-GPU check (not collected by pytest) of engine/lamport_all_reduce.py, the barrier-free one-shot
all-reduce for decode's small all-reduces, against torch's one-shot symmetric-memory kernel and NCCL, each inside
a CUDA graph.

Why: at 2 ranks, Mistral-7B decode spends 0.69 ms of its 3.96 ms step in 64 all-reduces of 8 KB, 10.8 us each
with torch's kernel, which copies its input in, waits for every peer, sums, and waits again (BENCHMARKS.md). Here
each rank writes its input straight into every peer's buffer and each reader spins until no slot holds the
"empty" bit pattern (-0.0 in bf16, which senders turn into +0.0), then sums the slots in rank order, so every
rank gets the same bits. Three buffer generations rotate (a counter on the GPU per program, so CUDA graphs can
replay it): a rank clears the generation it read last time, which no peer can write into again before this rank
has sent its next input. No barrier, no flag round trip. (TensorRT-LLM's "Lamport" all-reduce works this way.)

    python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/gpu/lamport_all_reduce.py

It checks the sums bit for bit against an all-gather summed in rank order, over many calls and sizes, then times
8 KB (and larger) all-reduces replayed from CUDA graphs. On the CPU, tests/test_lamport_all_reduce.py runs the
same kernel in Triton's interpreter, through the engine's route.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
from mistral_chat.engine.kernels.lamport_all_reduce import EMPTY, LamportAllReduce, buffer_slots  # noqa: E402


def gpu_main() -> None:
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    group = dist.group.WORLD.group_name
    capacity = 512 * 1024  # bf16 elements: 1 MB, the engine's fast-route limit
    buffer = symm_mem.empty(buffer_slots(world, capacity), dtype=torch.int16, device=device)
    handle = symm_mem.rendezvous(buffer, group)
    buffer.fill_(EMPTY)
    torch.cuda.synchronize()
    dist.barrier()
    lamport = LamportAllReduce(list(handle.buffer_ptrs), rank, capacity, device)

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    # correctness: bit for bit against the all-gathered inputs summed in rank order
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    bad = 0
    for i in range(300):
        n = (4096, 8192, 100, 32768, 5120, 1, 65536)[i % 7]
        x = torch.randn(n, device=device, dtype=torch.bfloat16, generator=gen)
        if i % 5 == 0:
            x[: n // 2] = -0.0
        out = lamport(x)
        gathered = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(gathered, x)
        want = torch.zeros(n, device=device, dtype=torch.float32)
        for g in gathered:
            want += g.float()
        bad += int(not torch.equal(out, want.to(torch.bfloat16)))
    say(f"world {world}: {300 - bad}/300 all-reduces equal the rank-order sum bit for bit")

    # speed: 64 all-reduces recorded in one CUDA graph (one decode step's worth), replayed
    symm_out = {}

    def torch_one_shot(x: torch.Tensor) -> torch.Tensor:
        out = symm_out.setdefault(x.numel(), torch.empty_like(x))
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm_buffer.narrow(0, 0, x.numel()), x, "sum", group,
                                                        out)
        return out

    def nccl(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    symm_buffer = symm_mem.empty(capacity, dtype=torch.bfloat16, device=device)
    symm_mem.rendezvous(symm_buffer, group)
    for n in (4096, 5120, 32768, 262144):
        x = torch.randn(n, device=device, dtype=torch.bfloat16)
        row = []
        for name, op in (("lamport", lamport), ("torch one-shot", torch_one_shot), ("nccl", nccl)):
            for _ in range(3):
                op(x)
            torch.cuda.synchronize()
            dist.barrier()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(64):
                    op(x)
            torch.cuda.synchronize()
            dist.barrier()
            graph.replay()
            torch.cuda.synchronize()
            dist.barrier()
            started = time.perf_counter()
            for _ in range(50):
                graph.replay()
            torch.cuda.synchronize()
            row.append(f"{name} {(time.perf_counter() - started) / (50 * 64) * 1e6:.2f} us")
            dist.barrier()
        say(f"world {world}, {n * 2 // 1024} KB: " + ", ".join(row))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    gpu_main()
