"""Manual multi-GPU check (not collected by pytest): do tensor-parallel ranks route a mixture of experts as one GPU?

Each world size, started by torchrun, loads a Mixtral checkpoint (its shard on each rank), prefills a fixed random
prompt eagerly and records, layer by layer, the gate's logits of every prompt token; rank 0 saves them with the
prompt's last logits. `--compare` then sets the runs side by side, layer by layer: how many tokens chose another
pair of experts than the reference run (world 1), how far the gate's logits moved, and how close the reference's
2nd and 3rd experts were where the choice differs. Rounding flips a choice only where that gap is about as small
as the gate's logits move; a fault of the sharding would flip choices at any gap, from the first layer on.

    python3 -m torch.distributed.run --nproc_per_node N benchmarks/gpu/moe_routing.py FOLDER OUT/routing-N.pt
    python3 benchmarks/gpu/moe_routing.py --compare OUT/routing-1.pt OUT/routing-2.pt [...]

On a machine without GPUs it runs on the CPU over gloo (use a tiny Mixtral), which only checks the script.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from mistral_chat.engine.parallel.group import leave_process_group
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.parallel.sharding import Parallel


def record(path: str, out: str, prompt: int, dtype: str) -> None:
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    model = load_model(path, device=str(device), dtype=dtype, parallel=Parallel(rank=rank, world=world)).model
    assert model.config.is_moe, f"{path} is not a mixture of experts"
    gates: list[list[torch.Tensor]] = [[] for _ in model.layers]
    chosen: list[list[torch.Tensor]] = [[] for _ in model.layers]
    for i, layer in enumerate(model.layers):
        moe = layer.feed_forward

        def route(x: torch.Tensor, moe=moe, route=moe.route, i=i) -> tuple[torch.Tensor, torch.Tensor]:
            gates[i].append(moe.gate(x).float().cpu())
            experts, weights = route(x)
            chosen[i].append(experts.cpu())  # as the GPU picked them
            return experts, weights
        moe.route = route
    model.setup_cache(prompt + 16, prefill_chunk=512)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), min(20000, vocab), (1, prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        logits = model(ids, 0)[0, -1].float().cpu()
    if rank == 0:
        torch.save({"world": world, "dtype": dtype, "logits": logits,
                    "gates": [torch.cat(g) for g in gates], "experts": [torch.cat(c) for c in chosen],
                    "top_k": model.layers[0].feed_forward.top_k}, out)
        print(f"world {world}: {len(gates)} layers, {prompt} tokens -> {out}", flush=True)
    dist.barrier()
    leave_process_group()


def compare(ref: dict, other: dict) -> list[dict]:
    """Per layer: tokens routed to another set of experts, the gate logits' largest move, and the reference's gap
    between its k-th and (k+1)-th expert at the tokens that differ (and over all tokens). A difference is "first
    hand" where no token up to this one chose differently at an earlier layer (attention mixes earlier tokens
    in): there only rounding moved the gate's input, so the gap must be about as small as the gate's move."""
    k, rows = ref["top_k"], []
    upstream = torch.zeros(len(ref["gates"][0]), dtype=torch.bool)  # a token chose differently at an earlier layer
    for layer, (a, b) in enumerate(zip(ref["gates"], other["gates"])):
        top_a = a.topk(k + 1, dim=-1)
        # the GPU's own picks: top-k re-run here could break an exact tie of bf16 gate logits another way
        chosen_a, chosen_b = ref["experts"][layer].sort(dim=-1).values, other["experts"][layer].sort(dim=-1).values
        differ = (chosen_a != chosen_b).any(dim=-1)
        first_hand = differ & ~(torch.cumsum(upstream.int(), 0) > 0)
        upstream |= differ
        gap = top_a.values[:, k - 1] - top_a.values[:, k]
        moved = (a - b).abs().amax(dim=-1)
        rows.append({"layer": layer, "tokens": len(a), "differ": int(differ.sum()),
                     "first_hand": int(first_hand.sum()),
                     "gap_first_hand_max": float(gap[first_hand].max()) if first_hand.any() else None,
                     "moved_median": float(moved.median()), "moved_max": float(moved.max()),
                     "gap_at_differ_max": float(gap[differ].max()) if differ.any() else None,
                     "gap_median": float(gap.median()),
                     "first_differ_token": int(differ.nonzero()[0]) if differ.any() else None})
    return rows


def print_comparison(files: list[str]) -> None:
    runs = [torch.load(f) for f in files]
    ref = runs[0]
    for other in runs[1:]:
        rows = compare(ref, other)
        print(f"\nworld {other['world']} against world {ref['world']} ({other['dtype']}): prompt's last logits differ "
              f"by at most {float((ref['logits'] - other['logits']).abs().max()):.3g}")
        print("layer  tokens with other experts (first hand)  first at token  gate logits moved (median / max)  "
              "ref's k-th minus (k+1)-th gate logit: where they differ first hand (max) / anywhere (max) / "
              "all tokens (median)")
        for r in rows:
            at = "-" if r["gap_at_differ_max"] is None else f"{r['gap_at_differ_max']:.4f}"
            hand = "-" if r["gap_first_hand_max"] is None else f"{r['gap_first_hand_max']:.4f}"
            first = "-" if r["first_differ_token"] is None else str(r["first_differ_token"])
            print(f"{r['layer']:5d}  {r['differ']:6d} of {r['tokens']:<6d} ({r['first_hand']:3d})          {first:>6}"
                  f"        {r['moved_median']:.4f} / {r['moved_max']:.4f}                 "
                  f"{hand} / {at} / {r['gap_median']:.4f}")
        total = sum(r["differ"] for r in rows)
        print(f"in all {total} of {sum(r['tokens'] for r in rows)} (token, layer) choices differ, "
              f"{sum(r['first_hand'] for r in rows)} of them first hand")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("paths", nargs="+", help="FOLDER OUT.pt, or with --compare the saved runs (reference first)")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if args.compare:
        print_comparison(args.paths)
    else:
        record(args.paths[0], args.paths[1], args.prompt, args.dtype)


if __name__ == "__main__":
    main()
