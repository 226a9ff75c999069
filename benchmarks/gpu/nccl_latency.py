"""Manual GPU check (not collected by pytest): latency of one decode-sized NCCL all-reduce (bf16 [1, 1, 4096]),
eager in place, eager functional, and inside a CUDA graph. Run on a machine with N GPUs:

    python3 -m torch.distributed.run --nproc_per_node N benchmarks/gpu/nccl_latency.py
"""
import os, time, torch, torch.distributed as dist
import torch.distributed._functional_collectives as funcol
rank = int(os.environ["RANK"]); torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
def timeit(fn, n):
    for _ in range(10): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e6
def plain(): dist.all_reduce(x)
def fun(): funcol.all_reduce(x, "sum", dist.group.WORLD).add_(0)
res = {"eager dist.all_reduce": timeit(plain, 500), "eager funcol.all_reduce": timeit(fun, 500)}
g = torch.cuda.CUDAGraph(); s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3): plain()
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g):
    for _ in range(64): dist.all_reduce(x)
res["graph (64 per replay), per all_reduce"] = timeit(g.replay, 50) / 64
if rank == 0:
    print(f"world {dist.get_world_size()}:", ", ".join(f"{k} {v:.1f} us" for k, v in res.items()), flush=True)
dist.destroy_process_group()
