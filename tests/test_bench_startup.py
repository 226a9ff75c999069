"""`mistral-chat bench --startup`: launch -> first byte and launch -> full speed of fresh `--prompt` processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mistral_chat.bench.startup import full_speed, token_times


def test_tokens_are_spread_along_the_bytes() -> None:
    arrivals = [(1.0, 10), (2.0, 20), (3.0, 40)]
    assert token_times(arrivals, 4) == [1.0, 2.0, 3.0, 3.0]
    assert token_times([], 3) == []


def test_full_speed_is_after_the_last_slow_window() -> None:
    slow = [0.1 * i for i in range(20)]  # 10 tok/s while decode compiles
    fast = [slow[-1] + 0.01 * (i + 1) for i in range(200)]  # then 100 tok/s
    steady, at = full_speed(slow + fast)
    assert steady == pytest.approx(100, rel=0.01)
    assert slow[-1] - 0.2 <= at <= fast[15]
    steady, at = full_speed([0.01 * i for i in range(100)])  # at full speed from the first token
    assert at == 0.0
    assert full_speed([0.0, 1.0]) == (None, None)


@pytest.mark.slow
def test_bench_startup_on_the_cpu(tmp_path) -> None:
    out = tmp_path / "startup.json"
    checkpoint = tmp_path / "ckpt"
    command = [sys.executable, "-m", "mistral_chat.bench", "--startup", "--shape", "tiny", "--device", "cpu",
               "--dtype", "float32", "--steps", "48", "--tp-checkpoint", str(checkpoint), "--no-warmup", "--no-compile"]
    done = subprocess.run([*command, "--json-file", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1st byte" in done.stdout and "warm" in done.stdout and "no-compile" in done.stdout
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["runs"]] == ["cold", "warm", "no-compile", "unwarmed"]
    for run in result["runs"]:
        assert run["status"] == "ok" and run["tokens"] == 48
        assert 0 < run["first_byte_s"] <= run["full_speed_s"] <= run["done_s"] <= run["exit_s"]
    assert checkpoint.joinpath("params.json").exists()  # kept, and reused by the next run
    again = subprocess.run([*command[:-2], "--json"], capture_output=True, text=True, timeout=300)  # cold, warm
    assert again.returncode == 0 and json.loads(again.stdout)["checkpoint_reused"]
