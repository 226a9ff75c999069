#!/usr/bin/env bash
# Manual tensor-parallel runs on a machine with several GPUs (not run by pytest):
#
#     bash tests/gpu_tp_runs.sh [STEP ...]     # default: every step (more than one 10-minute device call)
#
# Steps: 7b (bf16 at 1, 2, 4 GPUs, NCCL all-reduce), 7b-oneshot (2 and 4 GPUs with MISTRAL_CHAT_TP_ONESHOT=1),
# 7b-int8 (1, 2 and 4 GPUs, --quantize int8, eager: for the tokens), mixtral (full Mixtral-8x7B bf16 at 2 and 4
# GPUs). Decode is compiled into CUDA graphs except in 7b-int8, prefill eager (MISTRAL_CHAT_COMPILE_PREFILL=0: the
# prompt's speed is not what these measure).
# The random checkpoints are written once to /dev/shm and reused by later steps. Tables and JSON go under $OUT
# (the device tool's folder) or /tmp/mistral-chat-gpu; each step has its own time limit and prints each world as
# it ends, so a step cut short still shows the worlds it finished.
set -u
out=${OUT:-/tmp/mistral-chat-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MISTRAL_CHAT_COMPILE_PREFILL=0
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(7b 7b-int8 7b-oneshot mixtral)

bench() {  # bench NAME SECONDS ARGS...: one `bench --tp` run with its own limit; table and JSON under $out
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" python3 -m mistral_chat.bench --steps 64 --prompt 512 --json-file "$out/$name.json" "$@" 2>&1 |
        grep -v '^[WI][0-9]\{4\} ' | tee "$out/$name.txt"
}

nvidia-smi -L
nvidia-smi topo -m | head -8
m7=(--shape mistral-7b --tp-checkpoint /dev/shm/mistral-chat-m7)
for step in "${steps[@]}"; do
    case $step in
        7b) bench 7b 260 "${m7[@]}" --tp 1,2,4 ;;
        7b-oneshot) MISTRAL_CHAT_TP_ONESHOT=1 bench 7b-oneshot 190 "${m7[@]}" --tp 2,4 ;;
        7b-int8) bench 7b-int8 120 "${m7[@]}" --tp 1,2,4 --quantize int8 --no-compile ;;
        mixtral) bench mixtral 400 --shape mixtral-8x7b --tp-checkpoint /dev/shm/mistral-chat-mixtral --tp 2,4 ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
