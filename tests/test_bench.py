"""`mistral-chat bench` on the CPU: it builds the named shape, times prefill and decode at each batch, and reports
the floor; the numbers themselves are the GPU's business (BENCHMARKS.md), so nothing here is timed."""

from __future__ import annotations

import pytest
import json
import os
import subprocess
import sys


def test_bench_json_and_table_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    base = [sys.executable, "-m", "mistral_chat.bench.run", "--shape", "tiny", "--device", "cpu", "--prefill", "16",
            "--batch", "1,2", "--steps", "4", "--prompt", "24", "--no-compile"]
    proc = subprocess.run(base + ["--json-file", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["layers"] == 2 and result["weight_bytes_per_token"] > 0
    rows = [(r["engine"], r["what"], r["batch"]) for r in result["rows"]]
    assert rows == [("mistral-chat eager", "prefill 16", 1), ("mistral-chat eager", "decode after 24", 1),
                    ("mistral-chat eager", "decode step by step", 1), ("mistral-chat eager", "decode after 24", 2)]
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 and r.get("warmup_s", 0) >= 0 for r in result["rows"])
    assert "floor_pct" in result["rows"][1]  # batch 1 decode is compared with the floor
    # the kernel plan it ran (on the CPU: plain PyTorch), in the JSON and on the table's third line
    import torch

    from mistral_chat.engine.int4 import packed_matmul_available

    # bf16 on the CPU: torch's int8 and packed int4 matmuls
    int4 = "packed" if packed_matmul_available() else "torch"
    int8 = "packed" if hasattr(torch.ops.aten, "_weight_int8pack_mm") else "torch"
    plain = (f"kernel plan: fused=False attention=torch gemv=torch int8={int8} int4={int4} moe=torch "
             "int4_experts=torch norms_in_products=False all_reduce=none compile_decode=False decode_graphs=False "
             "batch_graphs=False")
    assert result["plan"] == plain
    lines = proc.stdout.splitlines()
    assert lines[2] == plain
    assert lines[3].split() == ["engine", "what", "batch", "ms", "tokens/s", "%", "floor", "warm-up", "s"]


@pytest.mark.slow
def test_bench_plan_overrides(tmp_path):
    """--plan KEY=VALUE replaces the plan's choices (a single-process run); a plan the CPU cannot run, an unknown
    field or a malformed pair is refused."""
    out = tmp_path / "bench.json"
    base = [sys.executable, "-m", "mistral_chat.bench.run", "--shape", "tiny", "--device", "cpu", "--prefill", "",
            "--batch", "1", "--steps", "2", "--prompt", "8", "--no-compile", "--layers", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MISTRAL_CHAT_KERNELS")}
    proc = subprocess.run(base + ["--plan", "all_reduce=none, compile_decode=0", "--json-file", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["plan"].startswith("kernel plan: fused=False attention=torch")
    for plan, message in (("gemv=triton", "the plan's Triton kernels cannot run on cpu"),
                          ("gemm=triton", "unknown plan field 'gemm'"), ("gemv", "give KEY=VALUE pairs")):
        proc = subprocess.run(base + ["--plan", plan], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode != 0 and message in proc.stderr, (plan, proc.stderr[-2000:])
