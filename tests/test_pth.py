"""Older native releases ship `consolidated.00.pth`: read weights-only (never unpickling objects), same logits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mistral_chat.engine.config import load_config
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.weights import CheckpointReader
from mistral_chat.errors import ModelFilesError
from tiny_models import write_tiny_model

MARKER = Path("/tmp/mistral_chat_test_pth_unpickled")


class Payload:
    """An object whose unpickling would run code (here: create MARKER)."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


def pth_folder(native: Path, dest: Path, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> Path:
    """A copy of a native model folder with consolidated.00.pth instead of consolidated.safetensors."""
    shutil.copytree(native, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    state = {k: v.to(dtype) for k, v in load_file(native / "consolidated.safetensors").items()}
    torch.save({**state, **(extra or {})}, dest / "consolidated.00.pth")
    return dest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pth")
    return {"mistral": write_tiny_model(root / "mistral", "mistral")}  # the window of 16 wraps the cache


@pytest.mark.parametrize("kind", ["mistral"])
def test_pth_logits_and_greedy_tokens_match_hf(tiny, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    path = pth_folder(tiny[kind]["native"], tmp_path / "pth")
    assert not list(path.glob("*.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(tiny[kind]["hf"], dtype=torch.float32,
                                              attn_implementation="eager").eval()
    ids = torch.randint(3, 32000, (1, 40), generator=torch.Generator().manual_seed(1))
    model = load_model(path, device="cpu", dtype="float32").model
    model.setup_cache(128)
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(model(ids, 0, all_logits=True), expected, atol=1e-4, rtol=1e-4)
        steps = 12
        want = hf.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           attention_mask=torch.ones_like(ids))[0, 40:].tolist()
        model.setup_cache(128)
        logits, got = model(ids, 0), []
        for pos in range(40, 40 + steps):
            got.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[got[-1]]]), pos)
    assert got == want


def test_pth_stored_dtype_and_auto_dtype(tiny, tmp_path):
    path = pth_folder(tiny["mistral"]["native"], tmp_path / "pth", dtype=torch.bfloat16)
    assert CheckpointReader(path, "native").stored_dtype() == torch.bfloat16
    assert load_model(path, device="cpu").dtype == torch.bfloat16  # auto on CPU keeps the checkpoint's dtype


def test_pth_with_pickled_objects_is_refused_unexecuted(tiny, tmp_path):
    MARKER.unlink(missing_ok=True)
    path = pth_folder(tiny["mistral"]["native"], tmp_path / "evil", extra={"args": Payload()})
    with pytest.raises(ModelFilesError, match="unpickle") as info:
        load_model(path, device="cpu", dtype="float32")
    assert "consolidated.00.pth" in str(info.value)
    assert not MARKER.exists()


def test_corrupt_pth_and_safetensors_preference(tiny, tmp_path):
    path = pth_folder(tiny["mistral"]["native"], tmp_path / "bad")
    (path / "consolidated.00.pth").write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(ModelFilesError, match="truncated or not a PyTorch checkpoint"):
        load_model(path, device="cpu", dtype="float32")
    # with both, the safetensors win (the .pth is never opened)
    shutil.copy(tiny["mistral"]["native"] / "consolidated.safetensors", path)
    reader = CheckpointReader(path, load_config(path).checkpoint_format)
    assert [f.name for f in reader.files] == ["consolidated.safetensors"]
