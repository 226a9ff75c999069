"""The decode attention kernel (engine/decode_attention.py), run on the CPU by Triton's interpreter: it equals
grouped_attention computed in float32 on the model's strided views (q transposed, k/v and the mask sliced from the
cache), over short caches, ragged tiles, caches split into many ranges (tiles and ranges made small here), grouped and
ungrouped heads, a padded head dimension and sliding windows that mask whole tiles and ranges; in bfloat16 too; with
each row's visible length it reads nothing past it; and it traces as one op under torch.compile(fullgraph=True) with a
symbolic key length. Continuous batching's forward_rows (rows at positions of their own, a mask per row) gives each
row's logits as that row alone. Dense and MoE tiny models decode the same greedy tokens past their window with it (the
plan's attention=triton) as with grouped_attention (attention=torch), eager, and compiled (dense)."""

from __future__ import annotations


import pytest

from tiny_models import compile_for_hopper, run_interpreted

pytest.importorskip("triton")

CHECK = r"""
import torch
from mistral_chat.engine.kernels import decode_attention as module
from mistral_chat.engine.model import grouped_attention

module.BLOCK_S, module.MIN_SPLIT = 16, 16  # small tiles and ranges: many of each in a short cache
gen = torch.Generator().manual_seed(0)

def case(b, t, hkv, g, d, s, window=None, dtype=torch.float32, capacity=None):
    h, capacity = hkv * g, capacity or s + 7
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, generator=gen).to(dtype)
    q = qkv[..., :h * d].view(b, t, h, d).transpose(1, 2)  # as Attention.forward makes them
    keys = torch.randn(b, hkv, capacity, d, generator=gen).to(dtype)
    values = torch.randn(b, hkv, capacity, d, generator=gen).to(dtype)
    query_pos = torch.arange(s - t, s)[:, None]  # the last t of s positions, the key in slot j at position j
    key_pos = torch.arange(capacity)[None, :]
    mask = (key_pos <= query_pos) & ((query_pos - key_pos < window) if window else True)
    return q, keys[:, :, :s], values[:, :, :s], mask[:, :s]

def check(*args, exact=True, **kwargs):
    q, k, v, mask = case(*args, **kwargs)
    got = module.decode_attention(q, k, v, mask)
    assert got.dtype == q.dtype and got.shape == q.shape and got.is_contiguous()
    want = grouped_attention(q.float(), k.float(), v.float(), mask)
    tol = dict(rtol=1e-5, atol=1e-5) if exact else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol, msg=lambda m: f"{args} {kwargs}: {m}")

check(1, 1, 2, 2, 16, 5)  # one tile, one range
check(2, 3, 2, 2, 24, 37)  # head dim 24 padded to 32; 3 ranges, the last ragged
check(2, 3, 1, 4, 16, 100, window=20)  # 7 ranges, the first 4 masked for every row
check(1, 1, 4, 1, 24, 70, window=9)  # no grouping; a row allows 9 keys
check(1, 16, 1, 8, 16, 40, window=10)  # 128 query rows: two row blocks
module.MIN_SPLIT = 64
check(2, 2, 2, 2, 16, 60, window=12)  # one range of 4 tiles, the first 2 masked: the output written directly
module.MIN_SPLIT = 16
check(2, 1, 2, 4, 16, 77, window=30, dtype=torch.bfloat16, exact=False)

# a mask per sequence ([B, T, S], continuous batching's rows at positions of their own), sliced from a wider one
q, k, v, _ = case(3, 2, 2, 2, 16, 50)
rows = torch.rand(3, 2, 57, generator=gen)[..., :50] < torch.tensor([0.2, 0.6, 1.0])[:, None, None]
rows[1] = False  # a row that may see nothing gives zeros, as grouped_attention's NaN-free counterpart would not
got = module.decode_attention(q, k, v, rows)
want = grouped_attention(q[[0, 2]], k[[0, 2]], v[[0, 2]], rows[[0, 2]][:, None, None])
torch.testing.assert_close(got[[0, 2]], want, rtol=1e-5, atol=1e-5)
assert torch.equal(got[1], torch.zeros_like(got[1]))
# with each row's visible length: the same, and what lies past it is not read (NaN there changes nothing)
lengths = module.visible_lengths(rows)
assert lengths[1] == 0 and 0 < lengths[0] <= 50 and rows[0, :, lengths[0]:].sum() == 0, lengths
k_nan, v_nan = k.clone(), v.clone()
for row, n in enumerate(lengths.tolist()):
    k_nan[row, :, n:], v_nan[row, :, n:] = float("nan"), float("nan")
torch.testing.assert_close(module.decode_attention(q, k_nan, v_nan, rows, lengths), got)

@torch.compile(fullgraph=True, dynamic=True)
def step(q, keys, values, mask, key_len):
    return module.decode_attention(q, keys[:, :, :key_len], values[:, :, :key_len], mask[:, :key_len]) * 2

q, k, v, mask = case(1, 2, 2, 2, 16, 40, window=25)
keys, values = k.as_strided((1, 2, 47, 16), k.stride()), v.as_strided((1, 2, 47, 16), v.stride())
for key_len in (33, 40):
    want = grouped_attention(q, keys[:, :, :key_len], values[:, :, :key_len], mask[:, :key_len]) * 2
    torch.testing.assert_close(step(q, keys, values, mask, key_len), want, rtol=1e-5, atol=1e-5)
assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for both key lengths

from mistral_chat.engine.config import ModelConfig
from tiny_models import count_calls, greedy_past_the_window, random_model
module.BLOCK_S, module.MIN_SPLIT = 64, 128
calls = count_calls(module, "decode_attention")  # model.Attention looks it up on the module at each call
for experts in (0, 4):
    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                         sliding_window=16, max_seq_len=64, num_experts=experts, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = random_model(config)  # the plan the loader chooses here: the kernel (Triton's interpreter)
    assert model.plan.attention == "triton", model.plan
    del calls[:]
    plain = greedy_past_the_window(random_model(config, attention="torch"))  # the same weights
    assert not calls
    fast = greedy_past_the_window(model)
    assert len(calls) == 20 * 2, len(calls)  # each decode step, each layer (the 8-token prompt: SDPA)
    assert fast[0] == plain[0], (experts, fast[0], plain[0])
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-4, atol=1e-4)
    if not experts:  # the kernel as one opaque op, compiled: same tokens (once: the MoE layers change nothing here)
        ids = greedy_past_the_window(model, compiled=True)[0]
        assert ids == fast[0], (experts, ids, fast[0])

# continuous batching's steps (forward_rows): rows at positions of their own, a mask per row in the kernel; each
# row's logits as the same tokens alone through the single-sequence path (window 16 < the longest row)
config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                     sliding_window=16, max_seq_len=64)
model = random_model(config)
ids = {0: list(range(5, 17)), 2: list(range(40, 63))}  # 12 and 23 tokens
alone = {}
for row, seq in ids.items():
    model.setup_cache(64, prefill_chunk=8)
    out = [model(torch.tensor([seq[:8]]), 0)[:, -1]]
    out += [model(torch.tensor([[t]]), p)[:, -1] for p, t in enumerate(seq[8:], start=8)]
    alone[row] = torch.cat(out)
model.setup_row_cache(64, batch=3, prefill_chunk=8)
del calls[:]
got = {0: [], 2: []}
for row, seq in ids.items():  # each prompt's first 8 tokens alone
    got[row].append(model.forward_rows(torch.tensor([seq[:8]]), torch.tensor([0]), slice(row, row + 1), 8))
for p in range(8, 23):  # then all three rows a step (rows without a sequence: token 0 at position 0)
    tokens = [[ids[0][p] if p < 12 else 0], [0], [ids[2][p]]]
    starts = torch.tensor([p if p < 12 else 0, 0, p])
    out = model.forward_rows(torch.tensor(tokens), starts, slice(0, 3), min(model.row_positions.capacity, p + 1))
    if p < 12:
        got[0].append(out[0:1])
    got[2].append(out[2:3])
for row in ids:
    torch.testing.assert_close(torch.cat(got[row]), alone[row], rtol=1e-4, atol=1e-4)
assert len(calls) >= 15 * 2, len(calls)  # the decode steps went through the kernel
print("ok")
"""


@pytest.mark.slow
def test_decode_attention_matches_grouped_attention():
    assert run_interpreted(CHECK, timeout=600).strip().endswith("ok")


def test_the_kernel_compiles_for_hopper():
    """Compiled for an H100 (sm_90) with Triton's own ptxas, as the GPU would: split into ranges and not (with
    programmatic dependent launch's wait, fused.pdl), and the ranges' combine."""
    triton = pytest.importorskip("triton")
    tl = triton.language
    from mistral_chat.engine.kernels import decode_attention

    names = ["q_ptr", "k_ptr", "v_ptr", "mask_ptr", "len_ptr", "out_ptr", "part_ptr", "lse_ptr"]
    types = ["*bf16", "*bf16", "*bf16", "*i1", "*i32", "*bf16", "*fp32", "*fp32"]
    ints = ["S", "SPLIT", "D", "T", "G", "HEADS_KV", "sq_b", "sq_h", "sq_t", "sq_d", "sk_b", "sk_h", "sk_s", "sk_d",
            "sv_b", "sv_h", "sv_s", "sv_d", "sm_b", "sm_t", "sm_s"]
    signature = dict(zip(names, types)) | dict.fromkeys(ints, "i32") | {"scale": "fp32"}
    constexprs = {"BLOCK_M": 16, "BLOCK_S": 64, "BLOCK_D": 128, "DOT": tl.bfloat16, "PRECISION": "tf32"}
    for direct in (False, True):  # a mask shared by the sequences (no lengths), and continuous batching's
        kernel = compile_for_hopper(decode_attention._attention_kernel, signature,
                                    constexprs | {"DIRECT": direct, "LENGTHS": direct, "PDL": True})
        assert "griddepcontrol.wait" in kernel.asm["ptx"]
    combine = compile_for_hopper(decode_attention._combine_kernel,
                                 {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "splits": "i32",
                                  "D": "i32"}, {"BLOCK_SPLITS": 8, "BLOCK_D": 128, "PDL": True})
    assert "griddepcontrol.launch_dependents" in combine.asm["ptx"]
