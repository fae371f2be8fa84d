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
case "$NP" in
  '' | *[!0-9]* | 0*) echo "mpirun.sh: error: NP must be an int >= 1, got '$NP'" >&2; exit 2 ;;
esac
# Help and version need no ranks; every other command is checked once here, as its ranks would check it (the
# world size included), before mpirun starts any: a bad value is one line and exit code 2.
for a in "$@"; do
  case "$a" in -h | --help | --version) exec "${PYTHON:-python}" -m fastattn_dist "$@" ;; esac
done
FASTATTN_PREFLIGHT_WORLD=$NP "${PYTHON:-python}" -m fastattn_dist "$@" || exit $?
args=(-n "$NP")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
# Open MPI refuses root and more ranks than cores by default; containers and CI runners are often both.
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  args+=(--oversubscribe)
fi
exec mpirun "${args[@]}" "${PYTHON:-python}" -m fastattn_dist "$@"
