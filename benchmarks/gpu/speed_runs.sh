#!/usr/bin/env bash
# Manual GPU runs for the open speed work, on a machine with one GPU (not run by pytest):
#
#     bash benchmarks/gpu/speed_runs.sh [STEP ...]     # default: every step (more than one 10-minute device call)
#
# Steps: speculate bf16 bf16-compiled bf16-graphs bf16-graphs-gemv bf16-graphs-fused int8-graphs graphs graphs-int8 graphs-mixtral load-speed bf16-grouped bf16-gemv int8 int8-inductor int8-gemv attention pdl profile profile-int8 startup check
# (or check-mistral, check-mixtral, check-nemo: one model each) vs-hf mixtral-16 mixtral-16-vs-hf prefill
# prefill-2048.
# Logs go under $OUT (the device tool's folder) or /tmp/mistral-chat-gpu. Each step has its own time limit, so one
# that hangs or compiles for too long cannot eat the others' time, and each prints as it goes. Compared on the
# same GPU, through the bench's kernel plan overrides (--plan KEY=VALUE; the plan is the table's third line): the
# default compiled decode against attention=torch (grouped_attention's products instead of the decode attention
# kernel), int8 with and without the Triton kernel (int8=torch: inductor's product), bf16 with the Triton GEMV
# kernel (gemv=triton); whether programmatic dependent launch hides a product's start in a CUDA graph (pdl:
# benchmarks/gpu/pdl.py), the products alone per matrix (int8-gemv: int8, by its portable bit operations and by its
# GPU path, and bf16, whole and halved), decode attention alone by cache length, a kernel profile of one decode
# step (bf16 and int8), the start-up of `mistral-chat --prompt` with an empty and then a warm compile cache, the
# GPU correctness check, the full side-by-side run with HF transformers (prefill 512 and 2048, decode at batch 1
# and 8), and Mixtral-8x7B cut to 16 layers, and eager prefill with and without the fused kernels (fused=0), also
# with a sliding window shorter than the prompt (prefill-2048: eager 2048 tokens alone). Several steps can run at
# once on one machine with several GPUs, one CUDA_VISIBLE_DEVICES and OUT each.
set -u
out=${OUT:-/tmp/mistral-chat-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(bf16 int8 int8-inductor profile profile-int8 startup check vs-hf mixtral-16)

log() {  # log NAME SECONDS COMMAND...: run, keep the log, show its end
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | grep -v '^[WI][0-9]\{4\} ' | tee "$out/$name.txt" | tail -25
}

startup() {  # a random Mistral-7B folder, then the one-shot CLI twice with the same (first empty) compile cache
    local model=/dev/shm/mistral-chat-m7 home=/tmp/mistral-chat-startup-home
    rm -rf "$home"
    python3 -c "import torch; from mistral_chat.bench.run import bench_shape
from mistral_chat.bench.checkpoint import write_random_checkpoint
write_random_checkpoint('$model', bench_shape('mistral-7b'), torch.bfloat16, device='cuda')"
    for run in empty warm no-compile; do  # the compile cache empty, then warm; then decode without inductor
        local flags=() started=$(date +%s%N)
        [ $run = no-compile ] && flags=(--no-compile)
        MISTRAL_CHAT_HOME=$home python3 -m mistral_chat.cli.main --model "$model" --prompt "Hello" --max-tokens 64 \
            --temperature 0 --verbose "${flags[@]}" \
            | { IFS= read -r -n 1 _; echo "$run: first answer byte $(( ($(date +%s%N) - started) / 1000000 )) ms after launch"; cat > /dev/null; }
        echo "$run: $(( ($(date +%s%N) - started) / 1000000 )) ms from launch to exit (64 tokens)"
    done
}
export -f startup

nvidia-smi -L
bench=(python3 -m mistral_chat.bench.run --shape mistral-7b --prefill "" --batch 1 --steps 64)
eager=(python3 -m mistral_chat.bench.run --shape mistral-7b --no-compile --batch 1 --steps 8)
for step in "${steps[@]}"; do
    case $step in
        bf16) log bf16 150 "${bench[@]}" ;;
        bf16-grouped) log bf16-grouped 150 "${bench[@]}" --plan attention=torch ;;
        int8) log int8 150 "${bench[@]}" --quantize int8 ;;
        int8-inductor) log int8-inductor 150 "${bench[@]}" --quantize int8 --plan int8=torch ;;
        bf16-gemv) log bf16-gemv 150 "${bench[@]}" --plan gemv=triton ;;
        int8-gemv) log int8-gemv 150 python3 benchmarks/gpu/int8_gemv.py ;;
        attention) log attention 150 python3 benchmarks/gpu/decode_attention.py ;;
        pdl) log pdl 120 python3 benchmarks/gpu/pdl.py ;;
        profile) log profile 150 python3 benchmarks/gpu/profile_decode.py --shape mistral-7b ;;
        profile-int8) log profile-int8 150 python3 benchmarks/gpu/profile_decode.py --shape mistral-7b --quantize int8 ;;
        startup) log startup 400 bash -c startup ;;
        load-speed) log load-speed 150 python3 benchmarks/gpu/load_speed.py /dev/shm/mistral-chat-m7 ;;
        graphs) log graphs 150 python3 benchmarks/gpu/graphs_check.py --steps 64 ;;
        graphs-int8) log graphs-int8 150 python3 benchmarks/gpu/graphs_check.py --steps 64 --quantize int8 ;;
        graphs-mixtral) log graphs-mixtral 150 python3 benchmarks/gpu/graphs_check.py --steps 32 --shape mixtral-8x7b \
            --layers 16 ;;
        bf16-compiled) log bf16-compiled 200 "${bench[@]}" \
            --plan compile_decode=1,decode_graphs=0,gemv=torch,moe=torch,norms_in_products=0 ;;
        bf16-graphs) log bf16-graphs 150 "${bench[@]}" --no-compile --plan decode_graphs=1 ;;
        bf16-graphs-gemv) log bf16-graphs-gemv 150 "${bench[@]}" --no-compile --plan decode_graphs=1,gemv=triton ;;
        bf16-graphs-fused) log bf16-graphs-fused 150 "${bench[@]}" --no-compile \
            --plan decode_graphs=1,gemv=triton,norms_in_products=1 ;;
        speculate) log speculate 200 python3 benchmarks/gpu/speculate.py ;;
        int8-graphs) log int8-graphs 150 "${bench[@]}" --quantize int8 --no-compile --plan decode_graphs=1 ;;
        check) for kind in mistral mixtral nemo; do log check-$kind 200 python3 benchmarks/gpu/check.py $kind; done ;;
        check-mistral|check-mixtral|check-nemo) log $step 200 python3 benchmarks/gpu/check.py ${step#check-} ;;
        vs-hf) log vs-hf 330 python3 -m mistral_chat.bench.run --shape mistral-7b --vs-hf --steps 64 ;;
        mixtral-16) log mixtral-16 180 python3 -m mistral_chat.bench.run --shape mixtral-8x7b --layers 16 --batch 1 \
            --prefill 2048 --steps 32 ;;
        mixtral-16-vs-hf) log mixtral-16-vs-hf 330 python3 -m mistral_chat.bench.run --shape mixtral-8x7b --layers 16 \
            --batch 1 --prefill 2048 --steps 32 --vs-hf ;;
        prefill-2048) log prefill-2048 150 "${eager[@]}" --prefill 2048 ;;
        prefill) log prefill-fused 150 "${eager[@]}" --prefill 16,512,2048
            log prefill-unfused 150 "${eager[@]}" --prefill 16,512,2048 --plan fused=0
            log prefill-window 150 "${eager[@]}" --prefill 2048 --window 1024 ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
