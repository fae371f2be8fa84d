#!/usr/bin/env bash
# The long-context measurements of docs/long_context.md in one call, on one GPU (written for an H200 with ~125 GiB of
# host memory and 16 cores), within a time budget (default 530 s: every step's timeout is cut to what is left).
#   bash scripts/long_context_session.sh OUTDIR
# Steps, in order of priority (a step starts only while at least MIN_STEP_S seconds are left):
#   host     host-memory read bandwidth (torch x.sum, THREADS threads) and the CPU decode kernel's GB/s, one run
#   ctx64k   bench-model 7b-mha at 65536 tokens, kv offload off and 32768: prefill ratio, decode host read rate
#   max      bench-model 7b-mha --context max (the longest context both tiers hold), prefill + 8 decode tokens
#   b24_8b   bench-model 8b at 131064 tokens (its 128K less the 8 decoded) with --gpu-budget-gb 24 (a 24 GB GPU's view)
#   b24_7b   bench-model 7b-mha at 131072 tokens with --gpu-budget-gb 24
#   trace    scripts/trace_offload_prefill.py: where a 4-layer slice's offloaded prefill spends its time
#   tests    tests/gpu/test_offload_gpu.py: the split cache equal to one tier on this GPU
# Every step runs under `timeout`; a failing step is reported and the next one runs. Writes under OUTDIR:
# session.log (everything printed), host_decode.json, <step>/bench_context_*.json, trace_offload_prefill_*.json,
# summary.md (printed last). BUDGET_S, MIN_STEP_S, THREADS, PYTHON adjust.
set -uo pipefail
OUT=${1:?usage: bash scripts/long_context_session.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-530}
MIN_STEP_S=${MIN_STEP_S:-40}
THREADS=${THREADS:-16}
LOG="$OUT/session.log"
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
STATUS=()

# step NAME CAP_S COMMAND...: run under timeout min(CAP_S, time left - 15 s for the summary); never fatal
step() {
  local name=$1 cap=$2; shift 2
  local remain=$(( $(left) - 15 ))
  if [ "$remain" -lt "$MIN_STEP_S" ]; then
    echo "== $name: skipped, $remain s left" | tee -a "$LOG"; STATUS+=("$name: skipped (time)"); return
  fi
  local t=$(( cap < remain ? cap : remain )) t0=$(date +%s)
  echo "== $name (timeout $t s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS+=("$name: ok, ${took} s") ;;
    124|137) STATUS+=("$name: TIMED OUT after ${took} s") ;;
    *) STATUS+=("$name: FAILED rc=$rc after ${took} s") ;;
  esac
  echo "== $name: rc=$rc, ${took} s" | tee -a "$LOG"
}

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>&1
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "threads", torch.get_num_threads())' 2>&1
  echo "cores: $(nproc)"; free -g 2>&1 | head -2
} | tee -a "$LOG"

BENCH=($PY -m fastattn_dist bench-model --world-size 1 --dist-backend nccl --decode-tokens 8 --repeats 1 --warmup 1)
step host 75 $PY scripts/bench_host_decode.py --threads "$THREADS" --gib 4 --models llama2-7b llama3-8b \
  --contexts 32768 131072 --batches 1 --impls compiled torch --runs 3 --budget 1 --max-seconds 45 \
  --out "$OUT/host_decode.json"
step ctx64k 170 "${BENCH[@]}" --model 7b-mha --context 65536 --kv-offload off 32768 --out "$OUT/ctx64k"
step max 260 "${BENCH[@]}" --model 7b-mha --context max --kv-offload auto --out "$OUT/max"
step b24_8b 100 "${BENCH[@]}" --model 8b --context 131064 --kv-offload auto --gpu-budget-gb 24 --out "$OUT/b24_8b"
step b24_7b 130 "${BENCH[@]}" --model 7b-mha --context 131072 --kv-offload auto --gpu-budget-gb 24 \
  --out "$OUT/b24_7b"
step trace 70 $PY scripts/trace_offload_prefill.py --model 7b-mha --layers 4 --context 65536 --gpu-tokens 32768 \
  --out "$OUT"
step tests 70 $PY -m pytest tests/gpu/test_offload_gpu.py -q -p no:cacheprovider

{
  echo; echo "## Steps ($(( $(date +%s) - START )) s in all)"
  for s in "${STATUS[@]}"; do echo "- $s"; done
  echo
  $PY scripts/long_context_summary.py "$OUT" 2>&1 || echo "summary failed (rc $?)"
} | tee "$OUT/summary.md" | tee -a "$LOG"
