"""One-shot options from the breadth issue, end to end through the CLI: --json, --stop, sampling controls,
--fim-prefix/--fim-suffix, --tools and --lora."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_chat.chat.fim import encode_fim
from mistral_chat.engine.generate import Session
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.sampling import SamplingParams
from test_lora import adapter_tensors, write_adapter
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("cli-options"), "mistral")["native"]


def cli(model_dir: Path, tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "MISTRAL_CHAT_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, "-m", "mistral_chat.cli.main", "--model", str(model_dir), "--device", "cpu",
                           *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_json_output_and_stop_string(model_dir, tmp_path):
    plain = cli(model_dir, tmp_path, "--prompt", "hello", "-n", "12", "--json")
    assert plain.returncode == 0, plain.stderr
    answer = json.loads(plain.stdout)
    assert answer["finish_reason"] == "length" and answer["generated_tokens"] == 12
    assert answer["prompt_tokens"] > 0 and answer["tool_calls"] is None and answer["text"]
    stop = answer["text"][4:7]
    cut = json.loads(cli(model_dir, tmp_path, "--prompt", "hello", "-n", "12", "--json", "--stop", stop).stdout)
    assert cut["text"] == answer["text"][:answer["text"].find(stop)]
    assert cut["finish_reason"] == "stop"


@pytest.mark.slow
def test_sampling_controls_are_seeded(model_dir, tmp_path):
    args = ("--prompt", "hello", "-n", "10", "-t", "0.8", "--min-p", "0.05", "--repetition-penalty", "1.3",
            "--presence-penalty", "0.5", "--seed", "7")
    a, b = cli(model_dir, tmp_path, *args), cli(model_dir, tmp_path, *args)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_fim_prints_the_middle(model_dir, tmp_path):
    out = cli(model_dir, tmp_path, "--fim-prefix", "def add(a, b):\n    ", "--fim-suffix", "\n", "-n", "6")
    assert out.returncode == 0, out.stderr
    loaded = load_model(model_dir, device="cpu")
    ids = encode_fim(loaded.tokenizer, "def add(a, b):\n    ", "\n")
    expected = "".join(Session(loaded, context_length=256).generate(ids, SamplingParams(max_tokens=6)))
    assert out.stdout == expected + ("" if expected.endswith("\n") else "\n")


@pytest.mark.slow
def test_tools_file_is_used_and_bad_files_are_one_line(model_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]))
    with_tools = cli(model_dir, tmp_path, "--prompt", "weather?", "-n", "6", "--tools", str(tools), "--json")
    without = cli(model_dir, tmp_path, "--prompt", "weather?", "-n", "6", "--json")
    assert with_tools.returncode == 0, with_tools.stderr
    assert json.loads(with_tools.stdout)["prompt_tokens"] > json.loads(without.stdout)["prompt_tokens"]
    (tmp_path / "bad.json").write_text("{not json")
    bad = cli(model_dir, tmp_path, "--prompt", "x", "--tools", str(tmp_path / "bad.json"))
    assert bad.returncode != 0 and "bad.json" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_lora_changes_the_answer_and_scale_zero_is_the_base(model_dir, tmp_path):
    adapter = write_adapter(tmp_path / "adapter", adapter_tensors(model_dir), scaling=2.0)
    base = cli(model_dir, tmp_path, "--prompt", "hello", "-n", "8")
    tuned = cli(model_dir, tmp_path, "--prompt", "hello", "-n", "8", "--lora", str(adapter))
    off = cli(model_dir, tmp_path, "--prompt", "hello", "-n", "8", "--lora", str(adapter), "--lora-scale", "0")
    assert tuned.returncode == 0, tuned.stderr
    assert off.stdout == base.stdout
    assert tuned.stdout != base.stdout
