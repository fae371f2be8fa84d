#!/usr/bin/env bash
# One device-tool call that gathers the GPU figures, on whatever GPUs the machine has.
#   bash scripts/gpu_session.sh OUTDIR [STEP...]
# Steps (default: tests emulate): tests (python -m pytest tests/gpu), tune (one GPU: fastattn-dist tune
# --emulate-tp for TPS), emulate (one GPU: bench --emulate-tp for TPS on the grid, reading tuned.json
# when tune ran first), model (one GPU: bench-model --emulate-tp, rank 0 of 70b at TP=8 and 8b at TP=4 and 2,
# and 8b at TP=1), trace (one GPU: the kernel trace of a 2-layer slice of 70b at TP=8, S=8K), decode (one GPU:
# bench-model --model 7b at world size 1), real (2+ GPUs: bench and bench-model at TP=all GPUs, NCCL and
# copy-engine paths, and the profiler's trace of one shape), block (one GPU: tune then bench at TP=2 h4096 8K),
# int8 (scripts/bench_int8_attention.py and bench_int8_block_model.py, --quick), hostdecode
# (scripts/bench_host_decode.py: the host's memory bandwidth and the CPU decode-attention kernel).
# TPS (default "4 2 8"), REPEATS, BENCH_ARGS, MODEL_ARGS, STANDIN_PATH (model step: nccl or copy_engine), T_* (step timeouts) adjust.
# Writes under OUTDIR: session.log (everything printed), tuned.json, bench_*.json, trace_*.json/png, prof/...
set -uo pipefail
OUT=${1:?output folder}
shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
STEPS=${*:-tests emulate}
LOG="$OUT/session.log"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$LOG"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cudnn", torch.backends.cudnn.version())' | tee -a "$LOG"
env | grep -E '^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS)=' | tee -a "$LOG"
run() { echo "+ $*" | tee -a "$LOG"; timeout "${T:-300}" "$@" 2>&1 | tee -a "$LOG"; }
for step in $STEPS; do
  case $step in
    tests) T=90 run python3 -m pytest tests/gpu/test_offload_gpu.py -q -p no:cacheprovider --tb=long
           T=${T_TESTS:-200} run python3 -m pytest tests/gpu -q -p no:cacheprovider --tb=short -rfE \
             --ignore=tests/gpu/test_offload_gpu.py ;;
    block) export FASTATTN_TUNED_PROFILE="$OUT/tuned.json"  # tune (whole blocks with the stand-ins), then bench
           T=${T_TUNE:-90} run python3 -m fastattn_dist tune --emulate-tp 2 --hidden 4096 --heads 32 --batch 1 \
             --seq 8192 --repeats 10 --warmup 2 --out "$OUT/tuned.json"
           T=${T_BENCH:-150} run python3 -m fastattn_dist bench --emulate-tp 2 --hidden 4096 --seq 8192 --batch 1 \
             --repeats 10 --out "$OUT" ;;
    int8) T=${T_INT8:-120} run python3 scripts/bench_int8_attention.py ${INT8_ARGS:---quick} --out "$OUT/int8"
          cp "$OUT/int8/bench_int8_attention.json" "$OUT/" 2>/dev/null; rm -rf "$OUT/int8"
          T=${T_INT8:-120} run python3 scripts/bench_int8_block_model.py ${INT8_ARGS:---quick} --out "$OUT/int8bm"
          cp "$OUT"/int8bm/*.json "$OUT/" 2>/dev/null; rm -rf "$OUT/int8bm" ;;
    hostdecode) T=${T_HOST:-150} run python3 scripts/bench_host_decode.py --out "$OUT/host_decode.json" \
                  ${HOST_ARGS:---contexts 32768 131072 --batches 1 4 --max-seconds 100} ;;
    emulate) [ -f "$OUT/tuned.json" ] && export FASTATTN_TUNED_PROFILE="$OUT/tuned.json"
             for tp in ${TPS:-4 2 8}; do
               T=${T_BENCH:-170} run python3 -m fastattn_dist bench --emulate-tp "$tp" --repeats "${REPEATS:-15}" \
                 --out "$OUT" ${BENCH_ARGS:-}
             done ;;
    tune) for tp in ${TPS:-4 2 8}; do  # the bench grid: batch 1 at 2K/8K/32K, batch 4 at 2K
            T=${T_TUNE:-120} run python3 -m fastattn_dist tune --emulate-tp "$tp" --out "$OUT/tuned.json" --batch 1
            T=${T_TUNE:-120} run python3 -m fastattn_dist tune --emulate-tp "$tp" --out "$OUT/tuned.json" --batch 4 \
              --seq 2048
          done ;;
    model) export FASTATTN_TUNED_PROFILE="$OUT/tuned.json"  # tune --model first: the model's auto reads it
           for spec in "8 70b" "4 8b" "2 8b --seq 8192 32768" "1 8b --seq 8192"; do
             set -- $spec
             if [ "$1" -gt 1 ] && [ -z "${NO_TUNE:-}" ]; then
               seqs=${3:+${*:4}}
               T=${T_TUNE:-120} run python3 -m fastattn_dist tune --model "$2" --emulate-tp "$1" --batch 1 \
                 --seq ${seqs:-2048 8192 32768} --repeats 5 --warmup 1 --standin-path "${STANDIN_PATH:-nccl}" \
                 --out "$OUT/tuned.json"
               [ -z "$seqs" ] && T=${T_TUNE:-120} run python3 -m fastattn_dist tune --model "$2" --emulate-tp "$1" \
                 --batch 4 --seq 2048 --repeats 5 --warmup 1 --standin-path "${STANDIN_PATH:-nccl}" --out "$OUT/tuned.json"
             fi
             T=${T_MODEL:-300} run python3 -m fastattn_dist bench-model --emulate-tp "$1" --model "$2" "${@:3}" \
               --repeats "${REPEATS:-3}" --warmup 1 --standin-path "${STANDIN_PATH:-nccl}" --out "$OUT" ${MODEL_ARGS:-}
           done ;;
    trace) T=${T_TRACE:-150} run python3 scripts/trace_model_overlap.py --model 70b --tp 8 --layers 2 --seq 8192 \
             --out "$OUT" ;;
    decode) T=${T_DECODE:-300} run python3 -m fastattn_dist bench-model --model 7b --world-size 1 --dist-backend nccl \
              --seq 8192 --decode-tokens 64 --repeats 3 --out "$OUT" ;;
    real) [ "$NGPU" -ge 2 ] || { echo "real: needs 2+ GPUs, this machine has $NGPU" | tee -a "$LOG"; continue; }
          T=400 run torchrun --standalone --nproc-per-node "$NGPU" -m fastattn_dist bench --out "$OUT"
          T=400 run torchrun --standalone --nproc-per-node "$NGPU" -m fastattn_dist bench-model --model 8b --no-hf \
            --seq 8192 --repeats 3 --out "$OUT"
          mkdir -p "$OUT/prof"
          T=150 run torchrun --standalone --nproc-per-node "$NGPU" -m fastattn_dist profile --dtype bfloat16 \
            --seq 8192 --hidden 8192 --heads 64 --kv-heads 64 --no-link --no-rope --compare --out "$OUT/prof" ;;
    *) echo "unknown step $step" | tee -a "$LOG" ;;
  esac
done
rm -f "$OUT"/bench_partial_*.json "$OUT"/*.md  # the device tool returns 8 files: the JSONs and this log
echo "done" | tee -a "$LOG"
