"""`mistral-chat bench --tp`: the random checkpoint it writes loads, and on CPU (gloo) world 2 decodes the greedy
tokens of world 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mistral_chat.bench.checkpoint import special_count, synthetic_tekken, write_random_checkpoint
from mistral_chat.bench.parallel import format_parallel_table, run_parallel_bench
from mistral_chat.bench.shapes import SHAPES
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.loader import load_model
from mistral_chat.text.tokenizer import StreamDecoder, load_tokenizer


def test_synthetic_tekken_covers_the_vocabulary_and_round_trips(tmp_path):
    for vocab in (512, 4096):
        (tmp_path / "tekken.json").write_text(json.dumps(synthetic_tekken(vocab, seed=1)))
        tok = load_tokenizer(tmp_path)
        assert tok.is_tekken and tok.vocab_size == vocab
        assert tok.num_special == special_count(vocab) == (20 if vocab == 512 else 1000)
        assert (tok.bos_id, tok.eos_id) == (1, 2)
        text = "Hello, world! ünïcode 123\n"
        assert tok.decode(tok.encode(text)) == text
        ids = torch.randint(0, vocab, (200,), generator=torch.Generator().manual_seed(0)).tolist()
        stream = StreamDecoder(tok)
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
        assert streamed == tok.decode(ids) and len(streamed) > 100
        assert tok.decode([vocab - 1]).strip().isalpha()  # the last id is an ordinary random word


def test_sharded_moe_checkpoint_loads(tmp_path):
    config = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=300,
                         num_experts=4, num_experts_per_tok=2, max_seq_len=256)
    write_random_checkpoint(tmp_path, config, torch.float32, seed=3, shard_bytes=40_000)
    index = json.loads((tmp_path / "consolidated.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"consolidated-00001-of-{len(files):05d}.safetensors"
    loaded = load_model(tmp_path, device="cpu", dtype="float32")
    assert loaded.config.num_experts == 4 and loaded.tokenizer.vocab_size == 300
    out = loaded.model.output.weight
    assert out[:special_count(300)].abs().max() == 0 and 0.015 < out[20:].std() < 0.025  # EOS never wins


@pytest.mark.slow
def test_world_2_decodes_the_tokens_of_world_1():
    result = run_parallel_bench("tiny", worlds=(1, 2), dtype="float32", device="cpu", prompt=24, steps=16)
    one, two = result.runs
    assert (one.world, two.world, one.status, two.status) == (1, 2, "ok", "ok"), (one.note, two.note)
    assert result.reference_world == 1
    assert len(one.ids) == 16 and one.finish_reason == "length" and one.repeatable
    assert two.ids == one.ids and two.same_leading == 16 and two.same_fraction == 1.0
    assert two.margin_at_divergence is None and two.first_logits_max_diff < 1e-4
    assert one.forced_same_fraction is None and two.forced_same_fraction == 1.0  # fed world 1's tokens
    assert len(set(one.ids)) > 1 and min(one.ids) >= special_count(SHAPES["tiny"].vocab_size)
    assert two.tokens_per_s > 0 and two.floor_ms_per_token > 0 and two.weight_bytes_per_gpu < one.weight_bytes_per_gpu
    # the median of three timed runs; the host's wait is only measured where it queues steps ahead (GPUs)
    assert len(two.timed_ms) == 3 and sorted(two.timed_ms)[1] == pytest.approx(two.ms_per_token)
    assert one.host_wait_pct is None and two.host_wait_pct is None
    assert "world" in format_parallel_table(result)


@pytest.mark.slow
def test_bench_cli_with_tp(tmp_path):
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, "-m", "mistral_chat.bench.run", "--shape", "tiny", "--tp", "1,2", "--device",
                           "cpu", "--dtype", "float32", "--steps", "8", "--prompt", "16", "--json-file", str(out)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("tiny (2 layers, float32) greedy, 8 tokens after a 16-token prompt, eager")
    assert [line.split()[0] for line in lines[3:5]] == ["1", "2"]
    runs = json.loads(out.read_text())["runs"]
    assert runs[0]["ids"] == runs[1]["ids"] and len(runs[0]["ids"]) == 8
    # each world's line as it ends (what a run killed midway still shows): world 2 names its all-reduce and its
    # agreement with world 1
    ends = [line for line in proc.stderr.splitlines() if line.startswith("world ")]
    assert ends[0].startswith("world 1: loaded in") and "through" not in ends[0]
    assert "all-reduces through NCCL, reference's argmax at 100% of its tokens" in ends[1]
