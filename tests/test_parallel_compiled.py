"""Compiled decode under tensor parallelism, on the CPU: 2 gloo ranks whose decode step goes through
torch.compile (the functional all-reduce traced into the graph, as CUDA graphs hold it on GPUs) give the same
greedy tokens and logits as the single-process eager engine, with the rotating cache wrapping. The ranks prefill
eagerly (decode.prefill), as `--tp` does on GPUs."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from mistral_chat.engine.loader import load_model
from tiny_models import write_tiny_model

RANK = r"""
import dataclasses, os, sys, torch, torch.distributed as dist
from mistral_chat.engine.decode import DecodeStep, prefill
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.parallel import collectives as parallel
from mistral_chat.engine.parallel.sharding import Parallel
rank, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
mode = sys.argv[6]
dtype = "bfloat16" if mode == "lamport" else "float32"
overrides = dict(item.split("=") for item in sys.argv[8].split(",") if item)
model = load_model(path, device="cpu", dtype=dtype, parallel=Parallel(rank=rank, world=2),
                   plan_overrides=overrides).model
fast_calls = []
if mode == "fast" or mode.startswith("fused"):  # the symmetric-memory route, gloo standing in for its GPU kernel
    def one_shot(buffer, x, group_name, out):
        fast_calls.append(x.numel())
        out.copy_(x)
        dist.all_reduce(out)
    name = dist.group.WORLD.group_name
    parallel._one_shot = one_shot
    parallel._fast_buffer = torch.empty(parallel.FAST_ALL_REDUCE_BYTES // 4)
    parallel._fast_route = (name, torch.float32, parallel.FAST_ALL_REDUCE_BYTES // 4)
if mode == "lamport":  # the real Lamport kernel in Triton's interpreter, over buffers the two processes share
    from mistral_chat.engine.kernels.lamport_all_reduce import LamportAllReduce, buffer_slots
    capacity = 8 * model.config.dim  # a prefill chunk fits, so prefill takes the kernel too
    buffers = [torch.from_file(f"{out}.buffer{r}", shared=True, size=buffer_slots(2, capacity), dtype=torch.int16)
               for r in range(2)]
    kernel = LamportAllReduce([b.data_ptr() for b in buffers], rank, capacity, torch.device("cpu"), block=64)
    def counted(x, out):
        fast_calls.append(x.numel())
        return kernel(x, out)
    parallel._fast_kernel, parallel._fast_buffer = counted, buffers[rank]
    parallel._fast_route = (dist.group.WORLD.group_name, torch.bfloat16, capacity)
ids = [int(i) for i in sys.argv[5].split(",")]
forced = [int(i) for i in sys.argv[9].split(",") if i]  # fed instead of this rank's own greedy tokens, if given
step = DecodeStep(model, compile=True)
tokens, logits_seen = [], []
with torch.no_grad():
    model.setup_cache(300, prefill_chunk=8)
    for start in range(0, len(ids), 8):
        logits = prefill(model, torch.tensor([ids[start:start + 8]]), start)
    pos = len(ids)
    for i in range(int(sys.argv[7])):
        token = logits.argmax(-1)
        tokens.append(int(token[0]))
        if forced:
            token = torch.tensor([forced[i]])
        logits = step(token.view(1, 1), pos)
        logits_seen.append(logits.clone())
        pos += 1
if rank == 0:
    torch.save({"tokens": tokens, "logits": torch.cat(logits_seen), "fast_calls": fast_calls,
                "rows_fused": model.rows_fused(torch.zeros(1, 1, model.config.dim)),
                "plan": dataclasses.asdict(model.plan)}, out)
dist.destroy_process_group()
os._exit(0)  # skip interpreter teardown: a compiled gloo rank sometimes aborts there ("terminate called ...")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("all_reduce", ["nccl", "fast", "lamport", "fused", "fused-mixtral"])
def test_compiled_tensor_parallel_decode_equals_single_process_eager(tmp_path, monkeypatch, all_reduce):
    """"nccl": the plain plan (no Triton here), all-reduces through c10d (gloo). "fast": the symmetric-memory
    route, gloo standing in for its kernel. "lamport": a bf16 model whose all-reduces run in the Lamport kernel
    (Triton's interpreter, buffers in files both ranks map), against the single-process bf16 engine. "fused": the
    plan chosen for 2 ranks where Triton runs (Triton's interpreter): the GEMV kernel with each norm inside the
    product that reads it and each residual add after the all-reduce (Transformer.rows_fused), over the
    symmetric-memory route, through the op that lets `wo` and `w2` push their outputs into the Lamport kernel's
    buffers (with gloo standing in for the Lamport kernel it multiplies, then all-reduces; the push itself:
    tests/test_lamport_all_reduce.py); "fused-mixtral": the same on a Mixtral model, whose experts go through
    experts_gemv's kernels (the gate and w13 computing the norm's scale, the experts' w2 through the op)."""
    kind = "mixtral" if all_reduce == "fused-mixtral" else "mistral"
    path = write_tiny_model(tmp_path / "m", kind)["native"]  # Mistral's window 16 < 20 + 3 tokens: the cache wraps
    ids = torch.randint(3, 32000, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    out, port = tmp_path / "rank0.pt", free_port()
    dtype, overrides = torch.float32, ""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the ranks inherit it: the plan's kernels only where set
    if all_reduce.startswith("fused"):
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if all_reduce == "lamport":
        pytest.importorskip("triton")
        from mistral_chat.engine.kernels.lamport_all_reduce import EMPTY, buffer_slots

        monkeypatch.setenv("TRITON_INTERPRET", "1")
        # neither the GEMV kernel (the tensor-parallel plan where Triton runs; so not the norms inside it either)
        # nor the eager paths' kernels (which prefill runs): the interpreter rounds their bf16 outputs by
        # truncation, where GPUs and the single-process reference round to nearest
        overrides = "gemv=torch,norms_in_products=0,fused=0"
        dtype = torch.bfloat16
        for r in range(2):  # every slot "empty" at first
            torch.full((buffer_slots(2, 8 * 64),), EMPTY, dtype=torch.int16).numpy().tofile(f"{out}.buffer{r}")
    # "fused" decodes fewer tokens (3): the interpreter's products over the 32000-row vocabulary are slow
    steps = 3 if all_reduce.startswith("fused") else 24

    model = load_model(path, device="cpu", dtype=str(dtype).removeprefix("torch.")).model  # the reference
    tokens, logits_seen, margins = [], [], []
    with torch.no_grad():
        model.setup_cache(300, prefill_chunk=8)
        for start in range(0, len(ids), 8):
            logits = model(torch.tensor([ids[start:start + 8]]), start)[:, -1]
        for pos in range(len(ids), len(ids) + steps):
            top = logits[0].float().topk(2).values
            margins.append(float(top[0] - top[1]))
            token = int(logits.argmax(-1)[0])
            tokens.append(token)
            logits = model(torch.tensor([[token]]), pos)[:, -1]
            logits_seen.append(logits)

    # bf16: two ranks' rounded partial sums (the interpreter truncates to bf16) against one process's products,
    # logits up to ~6: a few bf16 steps, enough to swap near-tied tokens, after which greedy paths part. So the
    # bf16 ranks are fed the reference's tokens, and each step's argmax must agree where no such swap can happen.
    atol = 1e-4 if dtype == torch.float32 else 0.25
    forced = ",".join(map(str, tokens)) if dtype == torch.bfloat16 else ""
    args = [str(port), str(path), str(out), ",".join(map(str, ids)), all_reduce, str(steps), overrides, forced]
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), *args], stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    errors = [proc.communicate(timeout=600)[1] for proc in ranks]
    assert all(proc.returncode == 0 for proc in ranks), errors
    got = torch.load(out)
    if forced:
        clear = [m > atol for m in margins]
        assert sum(clear) >= steps // 4, margins
        assert [t for t, c in zip(got["tokens"], clear) if c] == [t for t, c in zip(tokens, clear) if c]
    else:
        assert got["tokens"] == tokens
    assert got["rows_fused"] == all_reduce.startswith("fused")
    plan = got["plan"]
    kernels = all_reduce in ("lamport", "fused", "fused-mixtral")  # under Triton's interpreter
    assert plan["attention"] == ("triton" if kernels else "torch"), plan
    assert plan["fused"] == all_reduce.startswith("fused"), plan
    assert plan["gemv"] == ("triton" if all_reduce.startswith("fused") else "torch"), plan
    assert plan["all_reduce"] == "c10d", plan  # on the CPU; "fast" and "lamport" set up their route themselves
    if all_reduce in ("fast", "lamport") or all_reduce.startswith("fused"):  # each decode all-reduce went the fast way
        layers = len(model.layers)
        assert got["fast_calls"].count(model.config.dim) >= steps * (1 + 2 * layers), got["fast_calls"]
    else:
        assert got["fast_calls"] == []
    torch.testing.assert_close(got["logits"], torch.cat(logits_seen), atol=atol, rtol=0)
