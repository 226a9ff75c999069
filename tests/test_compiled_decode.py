"""The compiled decode step (torch.compile of one block for all layers, any cache bucket; CUDA graphs on a GPU)
agrees with eager decode on the tiny models, on the CPU: the same greedy tokens, with the rotating cache wrapping
and power-of-two cache buckets in play. Prefill runs eagerly."""

from __future__ import annotations

import pytest
import torch

from mistral_chat.engine.decode import DecodeStep, key_bucket, prefill
from mistral_chat.engine.loader import load_model
from tiny_models import random_model, write_tiny_model


def test_key_bucket_rounds_up_to_a_power_of_two_within_the_capacity():
    assert key_bucket(0, 4096) == 256 and key_bucket(255, 4096) == 256 and key_bucket(256, 4096) == 512
    assert key_bucket(3000, 4096) == 4096 and key_bucket(5000, 4096) == 4096
    assert key_bucket(10, 23) == 23  # a small (window) cache is read whole


def greedy(model, ids: list[int], steps: int, compile: bool, cache: int = 300) -> list[int]:
    step = DecodeStep(model, compile=compile)
    with torch.no_grad():
        model.setup_cache(cache, prefill_chunk=8)
        logits = None
        for start in range(0, len(ids), 8):
            logits = model(torch.tensor([ids[start:start + 8]]), start)[:, -1]
        out, pos = [], len(ids)
        for _ in range(steps):
            token = logits.argmax(-1)
            out.append(int(token[0]))
            logits = step(token.view(1, 1), pos)
            pos += 1
    return out


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compiled_decode_equals_eager(tmp_path, quantize):
    loaded = load_model(write_tiny_model(tmp_path, "mistral")["native"], device="cpu", dtype="float32",
                        quantize=quantize)
    ids = torch.randint(3, 32000, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    eager = greedy(loaded.model, ids, 24, compile=False)  # window 16: the cache of 23 slots wraps
    compiled = greedy(loaded.model, ids, 24, compile=True)
    assert compiled == eager


@pytest.mark.slow
def test_compiled_decode_serves_every_cache_bucket_with_one_graph():
    from torch._dynamo.utils import counters

    from mistral_chat.engine.config import ModelConfig
    from mistral_chat.engine.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=3, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                                    vocab_size=300, max_seq_len=2048))  # no window: the cache is read by buckets
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ids = list(range(1, 9))
    eager = greedy(model, ids, 560, compile=False, cache=2048)  # positions 8..567: buckets 256, 512 and 1024
    before = counters["stats"]["unique_graphs"]
    compiled = greedy(model, ids, 560, compile=True, cache=2048)
    assert compiled == eager
    assert counters["stats"]["unique_graphs"] - before == 1  # (a bucket equal to the whole cache adds one more)


@pytest.mark.slow
def test_stored_activations_change_no_value():
    """`materialize` only tells the compiler to keep a value in its own buffer: the feed-forward block gives the
    same output compiled as eager, and eager is untouched."""
    from mistral_chat.engine.materialize import materialize
    from mistral_chat.engine.model import FeedForward
    from mistral_chat.engine.parallel.sharding import Parallel

    torch.manual_seed(0)
    ffn = FeedForward(32, 64, Parallel()).eval()
    x = torch.randn(1, 1, 32)
    assert materialize(x) is x  # not compiling: the same tensor
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(ffn, fullgraph=True)(x)
        torch.testing.assert_close(compiled, ffn(x))


def test_prefill_runs_eagerly_and_gives_the_last_positions_logits():
    """`decode.prefill` is the model's forward pass, eager (nothing compiled, whatever the device or plan), and
    keeps only the last position's logits."""
    from torch._dynamo.utils import counters

    from mistral_chat.engine.config import ModelConfig

    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                         max_seq_len=64)
    model = random_model(config)
    tokens = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(1))
    model.setup_cache(64, batch=2, prefill_chunk=8)
    with torch.no_grad():
        want = model(tokens, 0)
    model.slots.reset()
    before = counters["stats"]["unique_graphs"]
    got = prefill(model, tokens, 0)
    assert counters["stats"]["unique_graphs"] == before
    assert got.shape == (2, 200) and not got.requires_grad
    torch.testing.assert_close(got, want[:, -1], rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_batched_mixtral_decode_equals_eager():
    """Batch 8 with 2 experts a token is more than the gathered path takes (8 pairs): eager runs each expert on its
    tokens, which a compiled block cannot (data-dependent shapes; `bench --shape mixtral-8x7b` failed at batch 8),
    so compiled decode runs every expert on every token, weighted by zero where not chosen: the same logits."""
    from mistral_chat.engine.config import ModelConfig

    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                         max_seq_len=64, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = random_model(config)
    prompt = torch.randint(0, 200, (8, 8), generator=torch.Generator().manual_seed(1))

    def decode(compile: bool) -> torch.Tensor:
        step = DecodeStep(model, compile=True) if compile else (lambda tokens, pos: model(tokens, pos)[:, -1])
        with torch.no_grad():
            model.setup_cache(64, batch=8, prefill_chunk=8)
            logits, seen = model(prompt, 0)[:, -1], []
            for pos in range(8, 12):
                logits = step(logits.argmax(-1).view(8, 1), pos)
                seen.append(logits)
        return torch.stack(seen)

    torch.testing.assert_close(decode(compile=True), decode(compile=False), rtol=1e-4, atol=1e-4)
