"""The memory estimate matches what loading really allocates, and a model that cannot fit is refused with advice."""

from __future__ import annotations

import pytest
import torch

from mistral_chat.engine.config import load_config
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.memory import check_fits, estimate_memory
from mistral_chat.errors import DeviceError
from tiny_models import write_tiny_model


def allocated_bytes(model: torch.nn.Module) -> tuple[int, int]:
    weights = cache = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        nbytes = t.numel() * t.element_size()
        if ".cache." in name:
            cache += nbytes
        elif not name.startswith("slots"):
            weights += nbytes
    return weights, cache


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_estimate_equals_allocation(tmp_path, kind, quantize):
    path = write_tiny_model(tmp_path, kind)["native"]
    loaded = load_model(path, device="cpu", dtype="float32", quantize=quantize)
    loaded.model.setup_cache(200, prefill_chunk=64)
    weights, cache = allocated_bytes(loaded.model)
    estimate = estimate_memory(load_config(path), torch.float32, 200, prefill_chunk=64, quantize=quantize)
    assert estimate.weights == weights
    assert estimate.kv_cache == cache


def test_too_big_is_refused_with_advice(tmp_path):
    config = load_config(write_tiny_model(tmp_path, "mistral")["native"])
    estimate = estimate_memory(config, torch.bfloat16, 512)
    with pytest.raises(DeviceError) as err:
        check_fits(estimate, estimate.total - 1, torch.device("cuda"), "tiny", None, 1, 512)
    message = str(err.value)
    assert "tiny needs about" in message and "--quantize int8" in message and "--tp 2" in message
    check_fits(estimate, estimate.total, torch.device("cpu"), "tiny", None, 1, 512)  # fits exactly: no error


def test_session_context_is_the_request_within_the_model_limit(tmp_path):
    from mistral_chat.engine.memory import DEFAULT_CONTEXT, session_context

    config = load_config(write_tiny_model(tmp_path, "mistral")["native"]).with_(max_seq_len=131072)
    assert session_context(config, None) == DEFAULT_CONTEXT
    assert session_context(config, 65536) == 65536  # the memory check sees what the session will allocate
    assert session_context(config, 1 << 20) == 131072
    assert session_context(config.with_(max_seq_len=512), None) == 512
