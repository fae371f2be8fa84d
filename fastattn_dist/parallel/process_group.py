"""Bootstrap: one function that joins the process group from torchrun, MPI, Slurm or explicit values.

Every collective gets a timeout (``timeout_s``), so a dead or stuck peer turns into an error
instead of a hang. ``init_distributed`` returns a ``DistContext``; ``shutdown`` tears it down.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("fastattn_dist")

DEFAULT_TIMEOUT_S = 120.0


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    launcher: str  # "torchrun", "mpi", "slurm", "explicit", "spawn"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the rendezvous port for local ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env_int(*names: str) -> Optional[int]:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return None


def detect_launcher() -> str:
    """Which launcher started this process: torchrun, mpi, slurm, or none."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return "torchrun"
    if any(n in os.environ for n in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")):
        return "mpi"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return "slurm"
    return "none"


def _mpi_rank_world() -> tuple[int, int, int]:
    rank = _env_int("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
    world = _env_int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")
    local = _env_int("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
    if rank is None or world is None:
        raise RuntimeError("MPI launch detected but rank/size variables are missing")
    return rank, world, local if local is not None else 0


def _mpi_rendezvous(rank: int) -> tuple[str, int]:
    """Rank 0 picks its address and a free port; mpi4py broadcasts them to all ranks."""
    try:
        from mpi4py import MPI
    except ImportError:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if addr and port:
            return addr, int(port)
        raise RuntimeError("launched under MPI/Slurm without mpi4py: install the 'mpi' extra "
                           "(pip install 'fastattn-dist[mpi]') or set MASTER_ADDR and MASTER_PORT") from None
    payload = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = int(os.environ.get("MASTER_PORT") or free_port("0.0.0.0"))
        payload = (addr, port)
    return MPI.COMM_WORLD.bcast(payload, root=0)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


def init_distributed(backend: Optional[str] = None, *, rank: Optional[int] = None,
                     world_size: Optional[int] = None, master_addr: Optional[str] = None,
                     master_port: Optional[int] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     launcher: Optional[str] = None) -> DistContext:
    """Initialise torch.distributed (once) and return this process's DistContext.

    Rank and world come from the arguments if given, else from torchrun's variables, else from
    MPI's (Open MPI, MPICH/PMI, MVAPICH) or Slurm's, in that order; a single process with none
    of them runs as world size 1. ``backend`` defaults to NCCL when CUDA GPUs are visible, else gloo.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    found = launcher or detect_launcher()
    local_rank = 0
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        found = launcher or "explicit"
        env_local = _env_int("LOCAL_RANK")
        local_rank = rank if env_local is None else env_local
    elif found == "torchrun":
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = _env_int("LOCAL_RANK") or 0
    elif found in ("mpi", "slurm"):
        rank, world_size, local_rank = _mpi_rank_world()
        master_addr, master_port = (master_addr, master_port) if master_addr and master_port else _mpi_rendezvous(rank)
    else:
        rank, world_size, found = 0, 1, "single"

    master_addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = master_port or _env_int("MASTER_PORT") or (free_port() if world_size == 1 else None)
    if master_port is None:
        raise RuntimeError("no rendezvous port: set MASTER_PORT (torchrun and our launchers do this)")

    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA GPUs; use 'gloo' on CPU")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if not dist.is_initialized():
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = device  # eager NCCL init: errors surface here, not in the first collective
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s), **kwargs)
    log.debug("rank %d/%d joined via %s (%s on %s)", rank, world_size, found, backend, device)
    return DistContext(rank, world_size, local_rank, backend, device, found)


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # teardown must not mask the real error of a failed run
            log.debug("destroy_process_group failed: %s", e)
