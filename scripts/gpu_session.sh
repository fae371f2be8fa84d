#!/usr/bin/env bash
# One device-tool call that gathers every GPU figure of the block (issues 3 and 5), on 2+ GPUs.
#   bash scripts/gpu_session.sh OUTDIR [quick]
# Writes: gpu_tests.log, bench_block.{md,json} (default NCCL group), bench_ctas.{md,json}
# (our all-reduces on an NCCL group limited to 8 CTAs, high-priority stream), prof/{trace.json,
# timeline.png,metrics.json} (the profiler on the 4096-hidden, S=8K block).
set -uo pipefail
OUT=${1:?output folder}
mkdir -p "$OUT/prof"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu_tests.log"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu_tests.log"
env | grep -E '^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS)=' | tee -a "$OUT/gpu_tests.log"
run() { echo "+ $*" | tee -a "$OUT/gpu_tests.log"; timeout "${T:-300}" "$@" 2>&1 | tee -a "$OUT/gpu_tests.log"; }
T=240 run python3 -m pytest tests/gpu -q -x -p no:cacheprovider
GRID=(--seq 2048 8192 32768)
[ "${2:-}" = quick ] && GRID=(--seq 8192)
T=300 run torchrun --standalone --nproc-per-node "$NGPU" -m fastattn_dist bench "${GRID[@]}" --out "$OUT"
T=150 run torchrun --standalone --nproc-per-node "$NGPU" -m fastattn_dist bench --seq 8192 --comm-max-ctas 8 \
  --comm-high-priority --no-graphs --out "$OUT/ctas"
[ -f "$OUT/ctas/bench_block.md" ] && mv "$OUT/ctas/bench_block.md" "$OUT/bench_ctas.md" \
  && mv "$OUT/ctas/bench_block.json" "$OUT/bench_ctas.json" && rmdir "$OUT/ctas"
T=120 run torchrun --standalone --nproc-per-node "$NGPU" -m fastattn_dist profile --dtype bfloat16 --seq 8192 \
  --hidden 4096 --heads 32 --kv-heads 32 --no-link --no-rope --compare --out "$OUT/prof"
echo "done" | tee -a "$OUT/gpu_tests.log"
