"""Mixtral's experts: the path a CUDA graph capture or torch.compile takes for several tokens (every expert on
every token, weighted by zero where not chosen: no data-dependent shapes) equals the grouped path eager prefill
takes (each expert on its own tokens)."""

from __future__ import annotations

import pytest
import torch

from mistral_chat.engine import moe
from mistral_chat.engine.parallel.sharding import Parallel


@pytest.mark.parametrize("tokens", [5, 9, 64])
def test_every_expert_path_equals_grouped_path(tokens, monkeypatch):
    torch.manual_seed(0)
    layer = moe.MoEFeedForward(dim=32, hidden_dim=48, num_experts=8, top_k=2, parallel=Parallel())
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(1, tokens, 32)
    assert tokens * 2 > moe.GATHER_MAX_PAIRS  # past the gathered path
    grouped = layer(x)
    monkeypatch.setattr(moe, "static_shapes", lambda x: True)
    every = layer(x)
    torch.testing.assert_close(every, grouped, rtol=1e-5, atol=1e-5)


def test_static_shapes_is_false_in_eager_cpu_code():
    assert not moe.static_shapes(torch.zeros(2))
