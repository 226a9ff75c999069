#!/usr/bin/env bash
#     bash benchmarks/gpu/instant_start.sh [STEP ...]
# One device call for the instant-start figures (issue 27) and what rides along, most important first, each step
# with its own time limit; logs under $OUT (or /tmp/mistral-chat-gpu):
#   graphed decode against the same eager step (greedy tokens, logits), the candidate for one GPU (the eager step
#   with the --tp kernels, captured in CUDA graphs: no compile before the first answer) against today's compiled
#   decode (same run), launch -> first byte / full speed (bench --startup),
#   the loader against safetensors and pinned reads, int4 decode, batch mode and the server, speculation.
set -u
out=${OUT:-/tmp/mistral-chat-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
only=" $* "  # step names to run (default: all)
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    [ "$only" != "  " ] && [[ "$only" != *" $name "* ]] && return
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | grep -v '^[WI][0-9]\{4\} ' | tee "$out/$name.txt" | tail -20
}
nvidia-smi -L
bench=(python3 -m mistral_chat.bench.run --shape mistral-7b --prefill "" --batch 1 --steps 64)
step graphs 80 python3 benchmarks/gpu/graphs_check.py --steps 32
step bf16-graphs 80 "${bench[@]}" --plan compile_decode=0,decode_graphs=1,gemv=triton,moe=triton,norms_in_products=1
step bf16 120 "${bench[@]}"
step startup 130 python3 -m mistral_chat.bench --startup --shape mistral-7b --steps 128 \
    --tp-checkpoint /dev/shm/mistral-chat-m7 --json-file "$out/startup.json"
step load-speed 70 python3 benchmarks/gpu/load_speed.py /dev/shm/mistral-chat-m7 --threads 4,16
step int4 60 "${bench[@]}" --quantize int4
step batch-mode 100 python3 -m mistral_chat.bench --batch-mode --shape mistral-7b --batch 32,64 --requests 128 \
    --steps 128 --tp-checkpoint /dev/shm/mistral-chat-m7 --json-file "$out/batch_mode.json"
step speculate 90 python3 benchmarks/gpu/speculate.py --no-compile
