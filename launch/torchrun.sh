#!/usr/bin/env bash
# Launch a fastattn-dist command under torchrun, on one node or many.
#
#   one node, 2 ranks:   launch/torchrun.sh demo
#   one node, 4 GPUs:    NPROC=4 launch/torchrun.sh demo --dtype bfloat16 --seq 8192 --hidden 4096 --heads 32 --kv-heads 8
#   two nodes (run on each; NODE_RANK 0 on the node at MASTER_ADDR):
#       NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh bench
#       NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh bench
#
# Several nodes wait for each other at MASTER_ADDR:MASTER_PORT for RDZV_TIMEOUT seconds, else the
# command's --timeout-s, else 300; then they fail, saying what they waited for.
# Ranks use NCCL when GPUs are visible, else gloo (override with --dist-backend).
set -euo pipefail
# A fresh install need not be activated: the repository's .venv (README) comes first on PATH when it exists.
venv="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
[ -d "$venv" ] && PATH="$venv:$PATH"
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
for v in NPROC NNODES; do
  case "${!v}" in
    '' | *[!0-9]* | 0*) echo "torchrun.sh: error: $v must be an int >= 1, got '${!v}'" >&2; exit 2 ;;
  esac
done
# Help and version need no ranks; every other command is checked once here, as its ranks would check it (the
# world size included), before torchrun starts any: a bad value is one line and exit code 2.
for a in "$@"; do
  case "$a" in -h | --help | --version) exec "${PYTHON:-python}" -m fastattn_dist "$@" ;; esac
done
FASTATTN_PREFLIGHT_WORLD=$((NPROC * NNODES)) "${PYTHON:-python}" -m fastattn_dist "$@" || exit $?
if [ "$NNODES" = 1 ]; then
  exec torchrun --standalone --nproc-per-node "$NPROC" -m fastattn_dist "$@"
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the node with NODE_RANK=0}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
MASTER_PORT=${MASTER_PORT:-29500}

# torchrun's static rendezvous waits 600 s by default, and a node whose node 0 never comes waits
# twice its timeout, silently: bound it, and say what we wait for.
timeout=${RDZV_TIMEOUT:-}
if [ -z "$timeout" ]; then
  prev=
  for a in "$@"; do
    case "$a" in --timeout-s=*) timeout=${a#--timeout-s=} ;; esac
    [ "$prev" = --timeout-s ] && timeout=$a
    prev=$a
  done
fi
# whole seconds, at least 1 (torchrun's rdzv timeout is an int)
timeout=$(awk -v t="${timeout:-300}" 'BEGIN { s = int(t); if (s < t) s++; if (s < 1) s = 1; print s }')
where="$MASTER_ADDR:$MASTER_PORT"

if [ "$NODE_RANK" = 0 ]; then
  echo "torchrun.sh: node 0 of $NNODES: hosting the rendezvous at $where; waiting up to $timeout s for" \
    "the other nodes" >&2
else
  echo "torchrun.sh: node $NODE_RANK of $NNODES: waiting up to $timeout s for node 0's rendezvous at $where" >&2
  # Wait for node 0's store ourselves: torchrun's own connect retries past its timeout, with a C++ stack per try.
  if ! why=$("${PYTHON:-python}" - "$MASTER_ADDR" "$MASTER_PORT" "$timeout" 2>&1 <<'EOF'
import socket, sys, time
host, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + limit
while True:
    try:
        socket.create_connection((host, port), timeout=max(0.1, min(2.0, end - time.monotonic()))).close()
        sys.exit(0)
    except socket.gaierror as e:
        sys.exit(f"cannot resolve {host}: {e}")
    except OSError as e:
        why = e.strerror or type(e).__name__
    if time.monotonic() >= end:
        sys.exit(why)
    time.sleep(0.2)
EOF
  ); then
    echo "torchrun.sh: error: node $NODE_RANK of $NNODES could not reach node 0's rendezvous at $where within" \
      "$timeout s ($why): start NODE_RANK=0 on $MASTER_ADDR, and check MASTER_ADDR, MASTER_PORT and firewalls" >&2
    exit 1
  fi
fi
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --rdzv-conf "timeout=$timeout" -m fastattn_dist "$@"
