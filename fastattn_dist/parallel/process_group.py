"""Bootstrap: one function that joins the process group from torchrun, MPI, Slurm or explicit values.

Every collective gets a timeout (``timeout_s``), so a dead or stuck peer turns into an error
instead of a hang. The rendezvous honours the same timeout: a rank that cannot bind, reach rank 0
or see all its peers within ``timeout_s`` raises ``RendezvousError`` saying what it waited for.
``init_distributed`` returns a ``DistContext``; ``shutdown`` tears it down.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("fastattn_dist")

DEFAULT_TIMEOUT_S = 120.0

LAUNCHER_VARIABLES = "RANK/WORLD_SIZE, OMPI_COMM_WORLD_*, PMI_*, SLURM_*"


class RendezvousError(RuntimeError):
    """Joining the process group failed within the timeout; the message says what was waited for."""


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


def env_int(*names: str) -> Optional[int]:
    """The first of these environment variables that is set and not empty, as an int (None if none is)."""
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return None


def local_ranks(default: int = 1) -> int:
    """Ranks of this job on this node, as the launcher says (torchrun, Open MPI, MPICH, Slurm; our own spawn
    sets LOCAL_WORLD_SIZE); ``default`` when none does (a parent about to spawn its ranks knows how many)."""
    return max(1, env_int("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                          "SLURM_NTASKS_PER_NODE") or default)


def detect_launcher() -> str:
    """Which launcher started this process: torchrun, mpi, slurm, or none."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return "torchrun"
    if any(n in os.environ for n in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")):
        return "mpi"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return "slurm"
    return "none"


def require_launcher() -> str:
    """The launcher that started this process (see ``detect_launcher``); ValueError if there is none.

    For ``--launcher env``: without this, a plain process would silently run as world size 1.
    """
    found = detect_launcher()
    if found == "none":
        raise ValueError(f"--launcher env needs torchrun, mpirun or Slurm variables ({LAUNCHER_VARIABLES}); "
                         "none found (use --launcher spawn to run local ranks)")
    return found


def _mpi_rank_world() -> tuple[int, int, int]:
    rank = env_int("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
    world = env_int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")
    local = env_int("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
    if rank is None or world is None:
        raise RuntimeError("MPI launch detected but rank/size variables are missing")
    return rank, world, local if local is not None else 0


def _mpi_rendezvous(rank: int) -> tuple[str, int]:
    """Rank 0 picks its address and a free port; mpi4py broadcasts them to all ranks."""
    try:
        from mpi4py import MPI  # the 'mpi' extra: only under mpirun
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


def _who(rank, world_size, launcher, master_addr, master_port):
    """(rank, world size, local rank, launcher, rendezvous address and port) from the arguments or the launcher."""
    if launcher == "env":
        launcher = require_launcher() if rank is None and world_size is None else None
    found = launcher or detect_launcher()
    local_rank = 0
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        found = launcher or "explicit"
        env_local = env_int("LOCAL_RANK")
        local_rank = rank if env_local is None else env_local
    elif found == "torchrun":
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = env_int("LOCAL_RANK") or 0
    elif found in ("mpi", "slurm"):
        rank, world_size, local_rank = _mpi_rank_world()
        master_addr, master_port = (master_addr, master_port) if master_addr and master_port else _mpi_rendezvous(rank)
    else:
        rank, world_size, found = 0, 1, "single"
    return rank, world_size, local_rank, found, master_addr, master_port


def init_distributed(backend: Optional[str] = None, *, rank: Optional[int] = None,
                     world_size: Optional[int] = None, master_addr: Optional[str] = None,
                     master_port: Optional[int] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     launcher: Optional[str] = None) -> DistContext:
    """Initialise torch.distributed (once) and return this process's DistContext.

    Rank and world come from the arguments if given, else from torchrun's variables, else from
    MPI's (Open MPI, MPICH/PMI, MVAPICH) or Slurm's, in that order; a single process with none
    of them runs as world size 1, unless ``launcher="env"``, which requires a launcher (ValueError).
    ``backend`` defaults to NCCL when CUDA GPUs are visible, else gloo. ``timeout_s`` bounds every
    collective and the rendezvous; a failed rendezvous raises ``RendezvousError``.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    rank, world_size, local_rank, found, master_addr, master_port = _who(rank, world_size, launcher, master_addr,
                                                                         master_port)
    master_addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = master_port or env_int("MASTER_PORT")
    if master_port is None and world_size > 1:
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
        # Our own rendezvous, not an init_method URL: torch's waits far past timeout_s, or forever.
        store = (dist.HashStore() if world_size == 1 else
                 rendezvous(master_addr, master_port, rank, world_size, timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    log.debug("rank %d/%d joined via %s (%s on %s)", rank, world_size, found, backend, device)
    return DistContext(rank, world_size, local_rank, backend, device, found)


def _ranks(rs: list) -> str:
    """[1, 2, 3, 5] -> 'ranks 1..3, 5'."""
    parts, i = [], 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        parts.append(str(rs[i]) if i == j else f"{rs[i]}..{rs[j]}")
        i = j + 1
    return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(parts)


def _within(fn, seconds: float):
    """``fn()``, or TimeoutError after ``seconds``. TCPStore's constructor can block forever (a
    listener that is no store never answers its handshake); it releases the GIL, so a thread bounds it."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name="fastattn-rendezvous", daemon=True)
    t.start()
    t.join(max(seconds, 0.0))
    if t.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["value"]


def _wait_until_reachable(addr: str, port: int, deadline: float) -> Optional[str]:
    """Poll ``addr:port`` with plain TCP connects until one succeeds (None) or the deadline (why not).

    Probing first keeps TCPStore's own connect loop, which retries past its timeout and logs a C++
    stack per try, off the common failure path."""
    why = "no attempt"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return why
        try:
            with socket.create_connection((addr, port), timeout=min(2.0, left)):
                return None
        except socket.gaierror as e:
            return f"cannot resolve {addr!r}: {e}"
        except OSError as e:
            why = e.strerror or type(e).__name__
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))


def rendezvous(addr: str, port: int, rank: int, world_size: int, timeout_s: float) -> "dist.Store":
    """Meet all ranks at a TCPStore on ``addr:port`` within ``timeout_s``; return the store.

    Rank 0 hosts the store (under torchrun the agent already does, and every rank is a client).
    Then every rank waits for all the others, so a missing peer is named here, within the timeout,
    instead of surfacing later as an opaque backend error. Raises ``RendezvousError``.
    """
    deadline = time.monotonic() + timeout_s
    where, me = f"{addr}:{port}", f"rank {rank} of {world_size}"
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    host = rank == 0 and not agent_store
    owner = "torchrun's agent store" if agent_store else "rank 0's store"
    hint = ("is torchrun's agent on node 0 still running?" if agent_store else
            "is rank 0 running, and do MASTER_ADDR/MASTER_PORT point at it?")

    def open_store(seconds: float, timed_out: str, failed) -> "dist.Store":
        """The TCPStore within ``seconds``, else a RendezvousError: ``timed_out``, or ``failed(error)``."""
        try:
            return _within(lambda: dist.TCPStore(addr, port, world_size, is_master=host, wait_for_workers=False,
                                                 timeout=timedelta(seconds=seconds)), seconds)
        except TimeoutError:
            raise RendezvousError(f"{me}: {timed_out}") from None
        except Exception as e:
            raise RendezvousError(f"{me}: {failed(e)}") from None

    def first_line(e: Exception) -> str:
        return str(e).splitlines()[0]

    if host:
        store = open_store(timeout_s, f"started the rendezvous store on port {port} but could not connect to it at "
                                      f"{where} within {timeout_s:g} s: is MASTER_ADDR={addr} this host?",
                           lambda e: f"could not listen on rendezvous port {port} ("
                                     f"{'address already in use' if 'EADDRINUSE' in str(e) else first_line(e)}): "
                                     f"another process holds it? pick a free MASTER_PORT")
    else:
        why = _wait_until_reachable(addr, port, deadline)
        if why is not None:
            raise RendezvousError(f"{me}: could not reach {owner} at {where} within {timeout_s:g} s ({why}): "
                                  f"{hint}")
        store = open_store(max(deadline - time.monotonic(), 1.0),
                           f"reached {where} but no rendezvous store answered there within {timeout_s:g} s: is "
                           f"another program using port {port}?",
                           lambda e: f"could not connect to {owner} at {where} within {timeout_s:g} s: "
                                     f"{first_line(e)}")
    store.set_timeout(timedelta(seconds=timeout_s))
    # The host gives up a moment after the others, so they can still ask its store who is missing.
    _join_barrier(store, rank, world_size, deadline + (1.0 if host else 0.0), timeout_s,
                  f"{me} (rendezvous at {where}): ", owner)
    return store


def _join_barrier(store, rank: int, world_size: int, deadline: float, timeout_s: float, context: str,
                  owner: str) -> None:
    # A torchrun restart reuses the agent's store: keys of an earlier attempt must not count.
    prefix = f"fastattn_dist/joined/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    keys = [f"{prefix}{r}" for r in range(world_size)]
    poll_s = min(0.5, 0.05 + world_size / 2000)  # every rank polls the one store: bound its load
    try:
        store.set(keys[rank], "1")
        store.add(prefix + "count", 1)
        # Poll a counter (as torch's own store barrier does): store.wait logs C++ warnings on timeout.
        while store.add(prefix + "count", 0) < world_size:
            if time.monotonic() > deadline:
                missing = [r for r in range(world_size) if not store.check([keys[r]])]
                raise RendezvousError(f"{context}{_ranks(missing)} did not join within {timeout_s:g} s")
            time.sleep(poll_s)
    except RendezvousError:
        raise
    except Exception as e:  # the store's host (rank 0 or the agent) went away mid-rendezvous
        raise RendezvousError(f"{context}lost {owner} (did its process exit?): {str(e).splitlines()[0]}") from None


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # teardown must not mask the real error of a failed run
            log.debug("destroy_process_group failed: %s", e)
