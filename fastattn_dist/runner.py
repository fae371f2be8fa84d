"""Running a job on every rank: spawn local ranks or join a launcher's group, then the few collectives
every job needs (the device, a barrier, the max over ranks, timers).

Used by every subcommand (demo, profile, bench, tune, generate, bench-model); no job launches ranks any other
way.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from .parallel.process_group import (DEFAULT_TIMEOUT_S, detect_launcher, env_int, init_distributed, local_ranks,
                                     require_launcher, shutdown)
from .parallel.spawn import spawn_ranks

# Set by launch/torchrun.sh and launch/mpirun.sh to the world size they are about to start: the command checks
# every value as each rank would (the launcher's world size included), then exits before any rank starts, so a
# bad value is one line and exit code 2 instead of one error per rank plus the launcher's own report.
PREFLIGHT_ENV = "FASTATTN_PREFLIGHT_WORLD"


class PreflightDone(Exception):
    """Raised by ``run_job`` in a preflight check once every value passed: nothing is left to run."""


def preflight_world() -> Optional[int]:
    value = os.environ.get(PREFLIGHT_ENV, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{PREFLIGHT_ENV} must be a world size >= 1, got {value!r}")
    return int(value)


@dataclass
class Launch:
    """How to get ranks: ``launcher`` auto (join torchrun/mpirun/Slurm if detected, else spawn), spawn or env."""

    world_size: int = 2
    launcher: str = "auto"
    dist_backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.launcher not in ("auto", "spawn", "env"):
            raise ValueError(f"launcher must be auto, spawn or env, got {self.launcher!r}")
        if self.dist_backend not in (None, "gloo", "nccl"):
            raise ValueError(f"dist backend must be gloo or nccl, got {self.dist_backend!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be > 0 s, got {self.timeout_s}")
        if self.dist_backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("--dist-backend nccl needs CUDA GPUs, and none is visible; use gloo on CPU")
        if self.launcher == "env" and preflight_world() is None:
            require_launcher()

    @property
    def mode(self) -> str:
        if preflight_world() is not None:
            return "env"  # checked as the launcher's ranks will run
        if self.launcher != "auto":
            return self.launcher
        return "env" if detect_launcher() != "none" else "spawn"

    def device_type(self) -> str:
        """Where the ranks will compute: cuda with NCCL (explicit, or the default under a launcher with GPUs)."""
        if self.dist_backend == "nccl":
            return "cuda"
        if self.dist_backend == "gloo" or self.mode == "spawn":
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 when spawning locally), before any rendezvous."""
    rank = env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
    return 0 if rank is None else rank


def launch_world_size(launch: Launch) -> int:
    """The world size the ranks will have: the launcher's under one (``--world-size`` does not apply
    there), else ``launch.world_size``. Lets the CLI check shapes before any rank starts."""
    if launch.mode == "spawn":
        return launch.world_size
    if preflight_world() is not None:
        return preflight_world()
    world = env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")
    return launch.world_size if world is None else world


def job_device() -> torch.device:
    """This rank's device: its GPU under NCCL (init_distributed set it), else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(device: torch.device) -> None:
    """All ranks got here, and this rank's device work queued so far is done."""
    sync(device)
    if world() > 1:
        dist.barrier()


def max_over_ranks(value: float, device: torch.device) -> float:
    if world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int,
            progress: Optional[Callable[[int, int, float], None]] = None) -> list:
    """Per-repeat times of ``fn`` in ms (CUDA events on GPUs, the host clock on CPU), each the max over
    ranks (the work is done when the slowest rank is); ranks start each repeat together.
    ``progress(i, repeats, ms)`` is called after each repeat."""
    for _ in range(warmup):
        fn()
    times = []
    for i in range(repeats):
        barrier(device)
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(max_over_ranks(ms, device))
        if progress is not None:
            progress(i + 1, repeats, times[-1])
    return times


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    return statistics.median(time_ms(fn, device, repeats, warmup))


def interleaved_median_ms(fns: Dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                          warmup: int) -> Dict[str, float]:
    """Median ms of each variant, timed in turn within each repeat (a, b, a, b, ...), so drift of the machine
    (clocks, neighbours on shared cores) falls on all variants alike instead of on whichever ran last."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += time_ms(fn, device, 1, 0)
    return {name: statistics.median(t) for name, t in times.items()}


def _share_cpu_cores() -> None:
    """CPU ranks of one node split its cores, unless the user set OMP_NUM_THREADS (torchrun does)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks()))


def run_job(job: Callable, launch: Launch, job_args: Sequence[Any] = (),
            check_world: Optional[Callable[[int], None]] = None, label: str = "fastattn-dist"):
    """Run ``job(rank, world_size, *job_args)`` on every rank; return rank 0's result (None on other ranks).

    ``check_world(world_size)`` validates what depends on the world size before any job runs: before the
    ranks are spawned, or, under a launcher, on every rank once the world size is known.
    """
    preflight = preflight_world()
    if preflight is not None:
        if check_world is not None:
            check_world(preflight)
        raise PreflightDone()
    if launch.mode == "spawn":
        backend = launch.dist_backend or "gloo"
        if check_world is not None:
            check_world(launch.world_size)
        cores = os.cpu_count() or 1
        if backend == "gloo" and launch.world_size > cores:
            # each simulated device needs its own core: shared cores slow compute and gloo's threads alike,
            # and tiles="auto" (which assumes one core per rank) then over-tiles
            print(f"[{label}] note: {launch.world_size} CPU ranks on {cores} cores: the simulated devices share "
                  "cores, so timings and tiles='auto' do not model separate devices", file=sys.stderr, flush=True)
        results = spawn_ranks(job, launch.world_size, tuple(job_args), backend=backend, timeout_s=launch.timeout_s)
        return results[0]
    ctx = init_distributed(launch.dist_backend, timeout_s=launch.timeout_s, launcher="env")
    if ctx.backend == "gloo":
        _share_cpu_cores()
    try:
        if check_world is not None:
            check_world(ctx.world_size)
        res = job(ctx.rank, ctx.world_size, *job_args)
        return res if ctx.rank == 0 else None
    finally:
        shutdown()
