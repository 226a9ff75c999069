"""`mistral-chat bench --batch-mode` on the CPU with the tiny shape: every part runs (batch at each size, raw
decode, greedy agreement, the server, HF transformers) and every answer has the asked length; the numbers
themselves are the GPU's business (BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from mistral_chat.bench.batch_mode import format_batch_table, run_batch_mode_bench
from mistral_chat.bench.command import BenchArgs, main


def test_batch_mode_on_the_cpu(tmp_path):
    args = BenchArgs(shape="tiny", device="cpu", dtype="float32", prompt=40, steps=12, batch="2,4", requests=10,
                     no_compile=True, vs_hf=True, tp_checkpoint=str(tmp_path / "ckpt"))
    result = run_batch_mode_bench(args)
    assert result.prompt_tokens == 40 and result.generated_tokens == 12 and not any("prompts of" in n
                                                                                   for n in result.notes)
    rows = {(r["engine"], r["batch"]): r for r in result.rows}
    for batch in (2, 4):
        row = rows[("mistral-chat batch", batch)]
        assert row["requests"] == 10 and row["tokens"] == 10 * 12  # EOS never cut an answer short
        assert row["tokens_per_s"] > 0 and row["raw_decode_tokens_per_s"] > 0 and row["vs_raw"] > 0
    has = importlib.util.find_spec
    if has("uvicorn") and has("starlette") and has("httpx"):
        serve = rows[("mistral-chat serve", 2)]
        assert serve["tokens"] == 120 and serve["vs_batch"] > 0
    if has("transformers"):
        hf = rows[("transformers eager generate", 4)]
        assert hf["requests"] == 4 and hf["tokens"] == 4 * 12 and rows[("mistral-chat batch", 4)]["vs_hf"] > 0
    # float32 on the CPU: the batch answers exactly as one request at a time does
    assert result.agreement["identical"] == result.agreement["requests"] == 3
    assert result.agreement["agreeing_tokens"] == result.agreement["tokens"] == 36
    assert result.agreement["fed_picks"] == result.agreement["fed_positions"] == 36  # every position, fed
    assert result.agreement["largest_gap"] == 0 and result.agreement["largest_margin_where_not"] is None
    table = format_batch_table(result)
    assert "mistral-chat batch" in table and "3 of 3 answers identical" in table
    assert "picks the same token at 36 of 36 positions" in table


@pytest.mark.slow
def test_batch_mode_command_line(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["--batch-mode", "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt", "24",
                 "--steps", "4", "--batch", "2", "--requests", "3", "--no-compile", "--json-file", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["requests"] == 3 and result["generated_tokens"] == 4
    assert [r["engine"] for r in result["rows"]][0] == "mistral-chat batch"
