"""Loading reads tensors one at a time from memory-mapped files: the anonymous host memory it takes stays near
the checkpoint's size (no float32 copy of a bf16 model, no second copy of the weights)."""

from __future__ import annotations

import pytest
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tiny_models import copy_tokenizer

PROBE = r"""
import sys, torch
from mistral_chat.engine.loader import load_model

def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")

peak = [0]
def progress(done, total):
    peak[0] = max(peak[0], rss_anon())

before = rss_anon()
loaded = load_model(sys.argv[1], device="cpu", dtype="auto", progress=progress)
peak[0] = max(peak[0], rss_anon())
assert loaded.dtype == torch.bfloat16
print(peak[0] - before)
"""


@pytest.mark.slow
def test_peak_host_memory_is_about_the_checkpoint_size(tmp_path: Path):
    dim, hidden, layers, vocab = 512, 2048, 8, 32768
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    state = {"tok_embeddings.weight": w(vocab, dim), "norm.weight": w(dim), "output.weight": w(vocab, dim)}
    for i in range(layers):
        p = f"layers.{i}"
        state.update({f"{p}.attention_norm.weight": w(dim), f"{p}.ffn_norm.weight": w(dim),
                      f"{p}.attention.wq.weight": w(dim, dim), f"{p}.attention.wk.weight": w(dim // 4, dim),
                      f"{p}.attention.wv.weight": w(dim // 4, dim), f"{p}.attention.wo.weight": w(dim, dim),
                      f"{p}.feed_forward.w1.weight": w(hidden, dim), f"{p}.feed_forward.w3.weight": w(hidden, dim),
                      f"{p}.feed_forward.w2.weight": w(dim, hidden)})
    save_file(state, tmp_path / "consolidated.safetensors")
    size = sum(t.numel() * t.element_size() for t in state.values())
    del state
    (tmp_path / "params.json").write_text(json.dumps({
        "dim": dim, "n_layers": layers, "head_dim": 64, "hidden_dim": hidden, "n_heads": 8, "n_kv_heads": 2,
        "norm_eps": 1e-5, "vocab_size": vocab, "rope_theta": 1e6}))
    copy_tokenizer(tmp_path, "v3")
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown <= 1.2 * size, f"loading {size / 1e6:.0f} MB of weights took {grown / 1e6:.0f} MB of host memory"
