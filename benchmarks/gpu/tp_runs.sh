#!/usr/bin/env bash
# Manual tensor-parallel runs on a machine with several GPUs (not run by pytest):
#
#     bash benchmarks/gpu/tp_runs.sh [STEP ...]     # default: every step (more than one 10-minute device call)
#
# Steps, in a sensible order:
#   checkpoint  write the random Mistral-7B checkpoint to /dev/shm (the bench steps also write it if missing)
#   direct      benchmarks/gpu/tp_decode.py under torchrun: compiled decode without the launcher (no command
#               broadcasts, no followers), at 2 ranks with symmetric-memory all-reduces and with NCCL ones
#               (the kernel plan's all_reduce=c10d), and at 4 ranks
#   profile     the same at 2 ranks, then rank 0's kernels over 20 compiled steps by kind (where world 2's time goes),
#               and what each kernel adds to a step in the pipeline (the previous kernel's end to its end)
#   profile-1   the same at 1 rank (one GPU's kernels, to set world 2's against)
#   variants    `profile` once per entry of $VARIANTS (space-separated; each `base` or a kernel plan override
#               KEY=VALUE[,KEY=VALUE...], tp_decode.py's --plan), printing each run's step time and one layer's
#               kernels in the pipeline: several plans compared in one call, e.g.
#               VARIANTS="base gemv=torch,norms_in_products=0 base gemv=torch,norms_in_products=0"
#               (CKPT=/dev/shm/mistral-chat-mixtral for the Mixtral checkpoint)
#   lamport     benchmarks/gpu/lamport_all_reduce.py at 2 and 4 ranks: the barrier-free one-shot all-reduce checked bit for
#               bit and timed in CUDA graphs next to torch's one-shot kernel and NCCL (~1 min)
#   launcher    `direct` at 2 ranks, then the compiled step with what `--tp`'s launcher adds to each step, one piece
#               at a time (argmax, the host reading the token, its NCCL broadcast, the gloo command): ~2 min
#   direct-kernels  `direct` at 2 ranks with each symmetric-memory kernel (all_reduce=symmetric: torch's, then
#               all_reduce=lamport)
#   7b          bench --tp 1,2,4, bf16, compiled decode (CUDA graphs): ~4 min
#   7b-2        bench --tp 1,2: ~3 min
#   7b-2-unfused  `direct` at 2 ranks with the norms and residual adds as kernels of their own
#               (norms_in_products=0): ~1.5 min
#   gemv        benchmarks/gpu/int8_gemv.py on one GPU: each product of Mistral-7B, whole and halved, alone in CUDA
#               graphs: int8 (inductor's, the kernel's two paths) and bf16 (cuBLAS, the GEMV kernel): ~2 min
#   7b-int8     bench --tp 1,2,4, --quantize int8, eager (for the tokens)
#   mixtral     bench --tp 1,2 (2 on GPUs under 120 GB), full Mixtral-8x7B bf16, compiled; writes its checkpoint
#               first (~100 s): ~5 min
#   mixtral-2-no-moe-kernel  `direct` at 2 ranks on the same checkpoint with the experts as inductor's products
#               over the gathered experts (moe=torch; norms then outside the products too): ~3 min
#   mixtral-1-moe-kernel  bench --tp 1 with experts_gemv's kernels on one GPU (--plan moe=triton; --tp 1 runs the
#               one-GPU bench, whose table is not the --tp bench's world 1 line): ~3 min
#   mixtral-2-unfused  `direct` at 2 ranks with experts_gemv's kernels but the norms as kernels of their own
#               (norms_in_products=0): ~3 min
#   mixtral-checkpoint  write the random full Mixtral-8x7B checkpoint to /dev/shm (~110 s; mixtral does it if missing)
#   mixtral-4   bench --tp 4 of the same checkpoint: ~3 min
#   mixtral-24  bench --tp 2,4 of the same checkpoint (on 4 GPUs, where world 1 was measured apart): ~5 min
#   profile-mixtral  `profile` at 2 ranks on the full Mixtral-8x7B checkpoint (written first if missing, ~110 s):
#               where a Mixtral decode step's time goes under --tp: ~5 min
#   routing     benchmarks/gpu/moe_routing.py at 1, 2 and 4 ranks on random Mixtral-8x7B weights cut to 8 layers (written
#               to /dev/shm first, ~25 s), bf16: which experts each layer's gate picks for a 512-token prompt,
#               compared with world 1's (is --tp's disagreement on Mixtral the routing flipping at near ties?): ~2 min
#   routing-f32 the same loaded in float32 (there rounding should flip almost no choice): ~2 min
# Prefill runs eagerly (the prompt's speed is not what these measure). `bench --tp` runs the plan each world's
# ranks choose (its --plan is for single-process runs): plan comparisons under --tp go through `direct`. Tables and
# JSON go under $OUT (the device tool's folder) or /tmp/mistral-chat-gpu. Each step has its own time limit; at
# the limit every mistral-chat Python process prints its stacks (faulthandler, SIGABRT), so a stuck step shows
# where each rank stands, and `bench --tp` prints each world as it ends.
set -u
out=${OUT:-/tmp/mistral-chat-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 MISTRAL_CHAT_DEBUG=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(checkpoint direct profile 7b 7b-int8 mixtral mixtral-4)

stacks_after() {  # stacks_after SECONDS: then make every mistral-chat Python process print its stacks (SIGABRT)
    sleep "$1"
    for p in $(pgrep -f 'm mistral_chat|tp_decode'); do
        case $(cat /proc/$p/comm 2>/dev/null) in python*) kill -ABRT "$p" ;; esac
    done
}

direct() {  # direct NAME SECONDS RANKS [PLAN [ARGS...]]: rank 0's lines shown, everything kept; PLAN: - (the plan
    # the ranks choose) or KEY=VALUE[,KEY=VALUE...] overrides (tp_decode.py --plan)
    local name=$1 limit=$2 ranks=$3 plan=${4:--}
    shift 4 2>/dev/null || shift $#
    [ "$plan" = - ] && plan=
    echo "== $name (limit $limit s)"
    stacks_after "$limit" >/dev/null 2>&1 & local watch=$!  # not on the pipe: `| tail` would wait for its sleep
    PYTHONPATH=$PWD python3 -m torch.distributed.run --nproc_per_node "$ranks" \
        benchmarks/gpu/tp_decode.py "${CKPT:-/dev/shm/mistral-chat-m7}" --plan "$plan" "$@" 2>&1 | grep -v '^[WI][0-9]\{4\} ' \
        | tee "$out/$name.txt" | grep -v '^\[rank [1-9]'
    pkill -P $watch sleep 2>/dev/null; kill $watch 2>/dev/null
}

random_checkpoint() {  # random_checkpoint SHAPE FOLDER [LAYERS]: random bf16 weights of a bench shape, made on the GPU
    python3 -c "import sys, torch; from mistral_chat.bench.run import bench_shape
from mistral_chat.bench.checkpoint import write_random_checkpoint
write_random_checkpoint(sys.argv[2], bench_shape(sys.argv[1], int(sys.argv[3]) or None), torch.bfloat16, device='cuda')" \
        "$1" "$2" "${3:-0}"
}

routing() {  # routing DTYPE WORLD...: benchmarks/gpu/moe_routing.py on the 8-layer Mixtral at each world, then compared
    local dtype=$1 files=()
    shift
    [ -d /dev/shm/mistral-chat-mixtral-8 ] || random_checkpoint mixtral-8x7b /dev/shm/mistral-chat-mixtral-8 8
    for ranks in "$@"; do
        [ "$ranks" -gt "$(nvidia-smi -L | wc -l)" ] && continue
        echo "== routing-$dtype-$ranks (limit 150 s)"
        PYTHONPATH=$PWD timeout 150 python3 -m torch.distributed.run --nproc_per_node "$ranks" benchmarks/gpu/moe_routing.py \
            /dev/shm/mistral-chat-mixtral-8 "$out/routing-$dtype-$ranks.pt" --dtype "$dtype" 2>&1 \
            | grep -v '^[WI][0-9]\{4\} ' | tail -3
        files+=("$out/routing-$dtype-$ranks.pt")
    done
    PYTHONPATH=$PWD python3 benchmarks/gpu/moe_routing.py --compare "${files[@]}" | tee "$out/routing-$dtype.txt"
}

bench() {  # bench NAME SECONDS ARGS...: one `bench --tp` run with its own limit; table and JSON under $out
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    stacks_after "$limit" >/dev/null 2>&1 & local watch=$!  # not on the pipe: `| tail` would wait for its sleep
    timeout $((limit + 20)) python3 -m mistral_chat.bench.run --steps 64 --prompt 512 --json-file "$out/$name.json" \
        "$@" 2>&1 | grep -v '^[WI][0-9]\{4\} ' | tee "$out/$name.txt"
    pkill -P $watch sleep 2>/dev/null; kill $watch 2>/dev/null
}

nvidia-smi -L
nvidia-smi topo -m | head -8
m7=(--shape mistral-7b --tp-checkpoint /dev/shm/mistral-chat-m7)
mx=(--shape mixtral-8x7b --tp-checkpoint /dev/shm/mistral-chat-mixtral)
for step in "${steps[@]}"; do
    case $step in
        checkpoint) random_checkpoint mistral-7b /dev/shm/mistral-chat-m7 ;;
        direct) direct direct-2 100 2; direct direct-2-nccl 100 2 all_reduce=c10d; direct direct-4 100 4 ;;
        profile) direct profile-2 120 2 - --profile ;;
        profile-1) direct profile-1 120 1 - --profile ;;
        variants) i=0
            for v in ${VARIANTS:-base}; do  # files numbered: a plan run twice keeps both
                i=$((i + 1))
                plan=$v
                [ "$v" = base ] && plan=-
                direct "profile-2-$i-$(echo "$v" | tr -c 'A-Za-z0-9\n' _)" 120 2 "$plan" --profile \
                    | grep -E '^== |back to back|kernel plan|^ +[0-9.]+ +[0-9.]+  ' | cut -c1-170
            done ;;
        lamport) for ranks in 2 4; do
                echo "== lamport-$ranks (limit 150 s)"
                timeout 150 python3 -m torch.distributed.run --nproc_per_node $ranks benchmarks/gpu/lamport_all_reduce.py 2>&1 \
                    | grep -v '^[WI][0-9]\{4\} ' | tee "$out/lamport-$ranks.txt"
            done ;;
        launcher) direct launcher-2 150 2 - --launcher ;;
        direct-kernels) direct direct-2-symmetric 100 2 all_reduce=symmetric
            direct direct-2-lamport 100 2 all_reduce=lamport ;;
        7b) bench 7b 300 "${m7[@]}" --tp 1,2,4 ;;
        7b-2) bench 7b-2 300 "${m7[@]}" --tp 1,2 ;;
        7b-2-unfused) direct direct-2-unfused 100 2 norms_in_products=0 ;;
        gemv) timeout 300 python3 benchmarks/gpu/int8_gemv.py 2>&1 | grep -v '^[WI][0-9]\{4\} ' | tee "$out/gemv.txt" ;;
        7b-int8) bench 7b-int8 300 "${m7[@]}" --tp 1,2,4 --quantize int8 --no-compile ;;
        mixtral)  # world 1 only where one GPU holds its 93 GB (H200)
            first=2
            [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0)" -gt 120000 ] && first=1,2
            bench mixtral 400 "${mx[@]}" --tp $first ;;
        mixtral-2-no-moe-kernel)
            [ -d /dev/shm/mistral-chat-mixtral ] || random_checkpoint mixtral-8x7b /dev/shm/mistral-chat-mixtral
            CKPT=/dev/shm/mistral-chat-mixtral direct mixtral-2-no-moe-kernel 250 2 moe=torch,norms_in_products=0 ;;
        mixtral-1-moe-kernel) bench mixtral-1-moe-kernel 250 "${mx[@]}" --tp 1 --plan moe=triton ;;
        mixtral-2-unfused)
            [ -d /dev/shm/mistral-chat-mixtral ] || random_checkpoint mixtral-8x7b /dev/shm/mistral-chat-mixtral
            CKPT=/dev/shm/mistral-chat-mixtral direct mixtral-2-unfused 250 2 norms_in_products=0 ;;
        mixtral-4) bench mixtral-4 250 "${mx[@]}" --tp 4 ;;
        mixtral-24) bench mixtral-24 450 "${mx[@]}" --tp 2,4 ;;
        profile-mixtral)
            [ -d /dev/shm/mistral-chat-mixtral ] || random_checkpoint mixtral-8x7b /dev/shm/mistral-chat-mixtral
            CKPT=/dev/shm/mistral-chat-mixtral direct profile-mixtral-2 300 2 - --profile ;;
        routing) routing bfloat16 1 2 4 ;;
        routing-f32) routing float32 1 2 4 ;;
        mixtral-checkpoint) random_checkpoint mixtral-8x7b /dev/shm/mistral-chat-mixtral ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
