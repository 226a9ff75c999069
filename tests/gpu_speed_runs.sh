#!/usr/bin/env bash
# Manual GPU runs for the open speed work, as one command for a machine with one GPU (not run by pytest):
#
#     bash tests/gpu_speed_runs.sh            # logs under $OUT (the device tool's folder) or /tmp/mistral-chat-gpu
#
# Each step has its own time limit, so one that hangs or compiles for too long cannot eat the others' time, and
# each prints as it goes. Compares, on the same GPU and in one call: default compiled decode against
# MISTRAL_CHAT_QUICK_COMPILE=1 (compile time and speed), int8 with and without the Triton kernel
# (MISTRAL_CHAT_INT8_KERNEL=1), a kernel profile of one decode step, and the GPU correctness check.
set -u
out=${OUT:-/tmp/mistral-chat-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run, keep the log, show its end
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | grep -v '^[WI][0-9]\{4\} ' | tee "$out/$name.txt" | tail -25
}

nvidia-smi -L
bench=(python3 -m mistral_chat.bench --shape mistral-7b --prefill "" --batch 1 --steps 64)
step bf16 150 "${bench[@]}"
step bf16-quick 120 env MISTRAL_CHAT_QUICK_COMPILE=1 "${bench[@]}"
step int8 150 "${bench[@]}" --quantize int8
step int8-kernel 150 env MISTRAL_CHAT_INT8_KERNEL=1 "${bench[@]}" --quantize int8
step profile-bf16 150 python3 tests/gpu_profile_decode.py --shape mistral-7b
step check 240 python3 tests/gpu_check.py
