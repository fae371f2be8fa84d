"""What every rank runs for ``fastattn-dist profile``: record the block, then gather to rank 0.

Per run (sequential = 1 tile, then tiled): warm-up calls with no recorder, then ``repeats``
recorded calls, each after a barrier so the ranks start together. Rank 0 returns the gathered
``Profile`` (on rank 0's clock) and what the report needs; other ranks return None.
"""
from __future__ import annotations

import os
from typing import Optional

from ..runner import barrier, sync
from ..workload import BlockConfig, start_rank
from .gather import estimate_clock_offsets, gather_profile
from .recorder import SpanRecorder, TorchProfilerRecorder

RUNS = ("sequential", "tiled")


def record_runs(block, x, mask, runs, warmup: int, repeats: int, recorder: SpanRecorder,
                log=None) -> None:
    """For each ``(label, tiles)``: ``warmup`` calls unrecorded, then ``repeats`` recorded ones."""
    device = x.device
    for label, tiles in runs:
        if log:
            log(f"[profile] {label}: {warmup} warm-up, {repeats} recorded")
        for _ in range(warmup):
            block(x, mask=mask, tiles=tiles)
        recorder.run = label
        for i in range(repeats):
            recorder.step = i
            barrier(device)
            block.recorder = recorder
            try:
                block(x, mask=mask, tiles=tiles)
            finally:
                block.recorder = None
        sync(device)


def torch_profile(block, x, mask, tiles, path: str) -> str:
    """One tiled call under torch.profiler with record_function ranges for our spans; Chrome trace to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    block(x, mask=mask, tiles=tiles)  # warm: the profiled call is a steady-state one
    rec = TorchProfilerRecorder(block.rank, x.device)
    rec.run = "torch-profiler"
    barrier(x.device)
    with profile(activities=acts) as prof:
        block.recorder = rec
        try:
            block(x, mask=mask, tiles=tiles)
        finally:
            block.recorder = None
        sync(x.device)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    prof.export_chrome_trace(tmp)
    os.replace(tmp, path)
    return path


def profile_rank(rank: int, world_size: int, cfg: BlockConfig, opts: Optional[dict] = None) -> Optional[dict]:
    """Everything one rank does for ``profile``. Needs the process group initialised (any launcher)."""
    opts = opts or {}
    w = start_rank(cfg, rank, world_size, "profile")
    device, log, mask, block, x, plan = w.device, w.log, w.mask, w.block, w.x, w.plan
    rec = SpanRecorder(rank, device)
    record_runs(block, x, mask, (("sequential", 1), ("tiled", cfg.tiles)), cfg.warmup, cfg.repeats, rec, log)
    spans = rec.spans()
    torch_trace = None
    if opts.get("torch_profiler"):
        out = opts.get("out") or "."
        torch_trace = torch_profile(block, x, mask, cfg.tiles, os.path.join(out, f"torch_trace_rank{rank}.json"))
        if log:
            log(f"[profile] torch.profiler trace of one tiled call: {torch_trace} (one per rank)")
    clock = estimate_clock_offsets()
    meta = {"device": str(device), "attention_backend": block.backend, "plan": list(plan.bounds),
            "num_tiles": plan.num_tiles, "describe": cfg.describe(), "dtype": cfg.dtype}
    prof = gather_profile(spans, clock, meta)
    return {"profile": prof, "torch_trace": torch_trace} if rank == 0 else None
