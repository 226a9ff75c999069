"""`mistral-chat bench` on the CPU: it builds the named shape, times prefill and decode at each batch, and reports
the floor; the numbers themselves are the GPU's business (BENCHMARKS.md), so nothing here is timed."""

from __future__ import annotations

import json
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
    header = proc.stdout.splitlines()[2]
    assert header.split() == ["engine", "what", "batch", "ms", "tokens/s", "%", "floor", "warm-up", "s"]
