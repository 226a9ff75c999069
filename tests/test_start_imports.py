"""What a start-up imports: loading a model and answering with the kernels' plan (Triton's interpreter on the CPU,
as the GPU runs them: the decode attention, RoPE-and-cache and MoE kernels, their custom ops called eagerly) never
imports torch._dynamo, which costs 1-4.5 s of a start on the H100 machine (docs/performance-log.md, 2026-12-06):
the meta-device skeleton skips its random init (on meta it runs through torch._refs, which imports dynamo), and
eager code calls the kernels' functions, not their custom ops (fused.kernel_op)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tiny_models import checks_env, write_tiny_model

pytest.importorskip("triton")

CHECK = r"""
import sys
from mistral_chat.engine.generate import Session
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.options import SamplingParams

for folder in sys.argv[1:]:
    loaded = load_model(folder, device="cpu", dtype="float32")
    assert loaded.plan.attention == "triton" and loaded.plan.fused, loaded.plan
    session = Session(loaded, context_length=64)
    text = "".join(session.generate([1, 5, 9, 14, 3, 22, 7, 8], SamplingParams(max_tokens=6)))
    assert len(session.generated_ids) == 6
print(sorted(m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor"))))
"""


@pytest.mark.slow
def test_loading_and_answering_with_the_kernels_imports_no_compiler(tmp_path):
    folders = [str(write_tiny_model(tmp_path / kind, kind)["native"]) for kind in ("mistral", "mixtral")]
    proc = subprocess.run([sys.executable, "-c", CHECK, *folders], capture_output=True, text=True, timeout=600,
                          env=checks_env(TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]
