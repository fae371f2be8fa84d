#!/usr/bin/env bash
# Launch a fastattn-dist command under torchrun, on one node or many.
#
#   one node, 2 ranks:   launch/torchrun.sh demo
#   one node, 4 GPUs:    NPROC=4 launch/torchrun.sh demo --dtype bfloat16 --seq 8192 --hidden 4096 --heads 32 --kv-heads 8
#   two nodes (run on each; NODE_RANK 0 on the node at MASTER_ADDR):
#       NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh bench
#       NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh bench
#
# Ranks use NCCL when GPUs are visible, else gloo (override with --dist-backend).
set -euo pipefail
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
if [ "$NNODES" = 1 ]; then
  exec torchrun --standalone --nproc-per-node "$NPROC" -m fastattn_dist "$@"
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the node with NODE_RANK=0}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" -m fastattn_dist "$@"
