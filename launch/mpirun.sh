#!/usr/bin/env bash
# Launch a fastattn-dist command under mpirun (needs the 'mpi' extra: mpi4py + an MPI).
# Rank 0 picks the rendezvous address and port (MASTER_ADDR/MASTER_PORT if set); mpi4py broadcasts them
# (see parallel/process_group.py). A rank that cannot bind, reach rank 0 or meet all its peers within
# --timeout-s fails, saying so.
#
#   one node, 2 ranks:   launch/mpirun.sh demo
#   one node, 4 ranks:   NP=4 launch/mpirun.sh demo --heads 16 --kv-heads 4
#   several nodes:       NP=16 HOSTFILE=hosts.txt launch/mpirun.sh bench     (hosts.txt: "node1 slots=8" lines)
#   Slurm:               srun -N 2 --ntasks-per-node 8 python -m fastattn_dist bench   (SLURM_* variables are read)
set -euo pipefail
# A fresh install need not be activated: the repository's .venv (README) comes first on PATH when it exists.
venv="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
[ -d "$venv" ] && PATH="$venv:$PATH"
NP=${NP:-2}
args=(-n "$NP")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
# Open MPI refuses root and more ranks than cores by default; containers and CI runners are often both.
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  args+=(--oversubscribe)
fi
exec mpirun "${args[@]}" "${PYTHON:-python}" -m fastattn_dist "$@"
