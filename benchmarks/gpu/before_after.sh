#!/usr/bin/env bash
# Same-run before/after on one GPU: the engine of an older checkout (its mistral_chat/ copied to $OLD, default
# .bench_old, carried with the device call) against this tree, alternating, with the same commands:
#
#     bash benchmarks/gpu/before_after.sh [STEP ...]     steps: bf16 int8 mixtral-16 greedy greedy-int8
#                                                       greedy-mixtral
#
# bf16: Mistral-7B shape, prefill 512 and 2048, batch-1 decode over 64 steps; int8: the same with --quantize int8;
# mixtral-16: Mixtral-8x7B cut to 16 layers; int8-again, mixtral-16-again: a second pair; host: int8 cut to 2
# layers, where a step is bound by the host's launch and guard work rather than by the weights; greedy: the greedy tokens of compiled decode on the same random
# weights in both trees (benchmarks/gpu/greedy_tokens.py). Logs under $OUT; a summary table last.
set -u
old=${OLD:-.bench_old}
out=${OUT:-/tmp/mistral-chat-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
here=$PWD
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(bf16 greedy int8 mixtral-16)

bench() {  # bench NAME ARGS...: the old tree, then this one
    local name=$1
    shift
    for tree in old new; do
        local dir=$here
        [ $tree = old ] && dir=$here/$old
        echo "== $name $tree"
        (cd "$dir" && PYTHONPATH=$dir timeout 290 python3 -m mistral_chat.bench "$@" \
            --json-file "$out/$name-$tree.json") > "$out/$name-$tree.txt" 2>&1
        tail -6 "$out/$name-$tree.txt"
    done
}

greedy() {  # greedy NAME ARGS...
    local name=$1
    shift
    for tree in old new; do
        local dir=$here
        [ $tree = old ] && dir=$here/$old
        (cd "$dir" && PYTHONPATH=$dir timeout 200 python3 "$here/benchmarks/gpu/greedy_tokens.py" "$@") \
            2> "$out/$name-$tree.err" | tail -1 > "$out/$name-$tree.json"
    done
    python3 - "$out/$name-old.json" "$out/$name-new.json" <<'PY'
import json, sys
old, new = (json.load(open(p)) for p in sys.argv[1:])
same = sum(a == b for a, b in zip(old["tokens"], new["tokens"]))
first = next((i for i, (a, b) in enumerate(zip(old["tokens"], new["tokens"])) if a != b), None)
print(f"greedy tokens: {same}/{len(old['tokens'])} equal; last logits sum old {old['last_logits_sum']:.4f} "
      f"new {new['last_logits_sum']:.4f}")
if first is not None and "margins" in old:
    print(f"first difference at step {first}: top-2 logit margin there old {old['margins'][first]} "
          f"new {new['margins'][first]}; logits sums up to it equal: "
          f"{old['logits_sums'][:first + 1] == new['logits_sums'][:first + 1]}")
PY
}

for step in "${steps[@]}"; do
    case $step in
        bf16) bench bf16 --shape mistral-7b --batch 1 --steps 64 --prefill 512,2048 ;;
        int8) bench int8 --shape mistral-7b --quantize int8 --batch 1 --steps 64 --prefill 2048 ;;
        int8-again) bench int8-again --shape mistral-7b --quantize int8 --batch 1 --steps 64 --prefill 2048 ;;
        mixtral-16) bench mixtral-16 --shape mixtral-8x7b --layers 16 --batch 1 --steps 32 --prefill 2048 ;;
        mixtral-16-again) bench mixtral-16-again --shape mixtral-8x7b --layers 16 --batch 1 --steps 32 --prefill 2048 ;;
        host) bench host --shape mistral-7b --quantize int8 --layers 2 --batch 1 --steps 64 --prefill "" ;;
        greedy) greedy greedy --shape mistral-7b ;;
        greedy-int8) greedy greedy-int8 --shape mistral-7b --quantize int8 ;;
        greedy-mixtral) greedy greedy-mixtral --shape mixtral-8x7b --layers 16 ;;
        *) echo "unknown step $step" ;;
    esac
done

python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':12} {'what':20} {'old ms':>8} {'new ms':>8} {'new/old':>8}")
for name in ("bf16", "int8", "int8-again", "mixtral-16", "mixtral-16-again", "host"):
    try:
        old, new = (json.loads((out / f"{name}-{t}.json").read_text()) for t in ("old", "new"))
    except (OSError, ValueError):
        continue
    rows = {(r["what"], r["batch"]): r["ms"] for r in old["rows"]}
    for r in new["rows"]:
        key = (r["what"], r["batch"])
        if key in rows:
            print(f"{name:12} {r['what']:20} {rows[key]:8.2f} {r['ms']:8.2f} {r['ms'] / rows[key]:8.3f}")
PY
