#!/usr/bin/env bash
#     bash benchmarks/gpu/instant_start.sh [STEP ...]
# The instant-start figures (issue 27) and what rides along, most important first, each step with its own time
# limit; logs under $OUT (or /tmp/mistral-chat-gpu). More than one device call's 600 s in all: name the steps.
#   graphs: one GPU's graphed decode and the compiled decode before it against torch's eager step (greedy tokens,
#   teacher-forced logits); startup: launch -> first byte / full speed (bench --startup, writes the checkpoint the
#   load steps read); the loader profiled and against safetensors and pinned reads; decode figures (bf16, Mixtral
#   16 layers, int8, int4); batch mode with the server and HF, and with its decode step in CUDA graphs
#   (the default on one GPU) and eagerly (--plan batch_graphs=0), and its step and host profiled;
#   speculation.
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
# Installed packages without .pyc files (the GPU machine's read-only site-packages) byte-compile every module they
# import in every process (~2.4 s measured): a pip install writes them, so give the runs a cache for them, filled
# once up front.
export PYTHONPYCACHEPREFIX=/tmp/mistral-chat-pyc
python3 -c "import os, torch; print('torch importable from a writable folder:', os.access(os.path.dirname(torch.__file__), os.W_OK))"
python3 -c "import torch, triton, torch._dynamo, torch._inductor.codecache, huggingface_hub, textual
import mistral_chat.cli.main, mistral_chat.engine.loader, mistral_chat.engine.decode, mistral_chat.api"
# HF transformers wants huggingface-hub < 2, which the app's own wheels replace: HF_SITE, if set, is a site folder
# without it, for the step that runs transformers next to the engine (which needs no hub for a local folder).
hf_env=()
[ -n "${HF_SITE:-}" ] && hf_env=(env "PYTHONPATH=$PWD:$HF_SITE")
timeline() {  # the CLI with a stack sampler: where launch -> answer goes. Empty Triton cache, then warm, then empty
    # again with the kernel warm-up left out (what it saves)
    local home=/tmp/mistral-chat-timeline
    rm -rf $home $home-unwarmed
    for run in cold warm unwarmed; do
        echo "-- $run"
        local h=$home flag=
        [ $run = unwarmed ] && h=$home-unwarmed flag=--no-warmup
        MISTRAL_CHAT_HOME=$h TRITON_CACHE_DIR=$h/triton python3 benchmarks/gpu/startup_timeline.py $flag -- \
            --model "$1" --prompt "Write a long story about a lighthouse keeper and the sea." --max-tokens 64 -v \
            --temperature 0 2>&1 >/dev/null
    done
}
bench=(python3 -m mistral_chat.bench.run --shape mistral-7b --prefill "" --batch 1 --steps 64)
ckpt=/dev/shm/mistral-chat-m7
step graphs 110 python3 benchmarks/gpu/graphs_check.py --steps 32
step startup 130 python3 -m mistral_chat.bench --startup --no-warmup --shape mistral-7b --steps 128 \
    --tp-checkpoint $ckpt --json-file "$out/startup.json"
export -f timeline
step timeline 90 bash -c 'timeline "$0"' $ckpt
step load-profile 70 python3 benchmarks/gpu/load_profile.py $ckpt
step bf16 50 "${bench[@]}" --batch 1,8
step batch-mode 200 "${hf_env[@]}" python3 -m mistral_chat.bench --batch-mode --shape mistral-7b --batch 32,64 --vs-hf \
    --tp-checkpoint $ckpt --json-file "$out/batch_mode.json"
step batch-eager 120 python3 -m mistral_chat.bench --batch-mode --shape mistral-7b --batch 32,64 \
    --plan batch_graphs=0 --tp-checkpoint $ckpt --json-file "$out/batch_mode_eager.json"
step batch-host 100 python3 benchmarks/gpu/batch_host.py $ckpt --batch 64
step profile-batch 100 python3 benchmarks/gpu/profile_batch.py --shape mistral-7b --batch 64 --prompt 512 --steps 32 \
    --attention-programs 264,528,1056,2112
step mixtral 80 python3 -m mistral_chat.bench.run --shape mixtral-8x7b --layers 16 --prefill "" --batch 1,8 --steps 32
step int8 50 "${bench[@]}" --quantize int8
step int4 60 "${bench[@]}" --quantize int4
step int4-check 130 python3 benchmarks/gpu/int4_check.py --parts products,decode --modes int8,int4 --before
step int4-mixtral 150 python3 benchmarks/gpu/int4_check.py --parts mixtral
step int4-mixtral-decode 120 "${bench[@]}" --shape mixtral-8x7b --quantize int4
step int4-sweep 300 python3 benchmarks/gpu/int4_check.py --parts products,decode --modes int8,int4 --sweep
step startup-int8 120 python3 -m mistral_chat.bench --startup --no-warmup --shape mistral-7b --steps 128 \
    --tp-checkpoint $ckpt --quantize int8 --json-file "$out/startup_int8.json"
step graphs-int8 60 python3 benchmarks/gpu/graphs_check.py --steps 32 --quantize int8 --no-compile
step load-speed 70 python3 benchmarks/gpu/load_speed.py $ckpt --threads 16
step speculate 120 python3 benchmarks/gpu/speculate.py
