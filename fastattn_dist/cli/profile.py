"""``fastattn-dist profile``: what every rank runs (record the block, then gather to rank 0) and the report.

Per run (sequential = 1 tile, then tiled): warm-up calls with no recorder, then ``repeats``
recorded calls, each after a barrier so the ranks start together. Rank 0 returns the gathered
``Profile`` (on rank 0's clock) and what the report needs; other ranks return None.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Dict, List, Optional

from ..profiler.export import write_outputs
from ..profiler.gather import Profile, estimate_clock_offsets, gather_profile
from ..profiler.metrics import format_runs, format_tiles
from ..profiler.report import render
from ..recorder import SpanRecorder, TorchProfilerRecorder
from ..runner import barrier, launch_rank, run_job, sync
from .block_job import BlockConfig, start_rank
from .options import (add_link_options, add_rank_options, add_shape_options, add_timing_options, launch_from_args,
                      out_dir)

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
    from torch.profiler import ProfilerActivity, profile  # loads Kineto: only when --torch-profiler asks

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


def print_report(prof: Profile, summary: dict, files: Dict[str, bytes], paths: List[str], describe: str,
                 tiles, repeats: int, torch_trace: bool, out: str) -> None:
    print(f"fastattn-dist profile: {prof.world_size} ranks ({prof.backend}, {prof.meta.get('device')}), "
          f"attention backend {prof.meta.get('attention_backend')}")
    print(f"  {describe}")
    print(f"  tile plan ({tiles}): {prof.meta.get('num_tiles')} tiles over rows {prof.meta.get('plan')}")
    for c in prof.clocks[1:]:
        print(f"  clock of rank {c.rank} vs rank 0: {c.offset_us:+.1f} us (error <= {c.error_us:.1f} us)")
    print()
    print(format_runs(summary))
    tiled = summary["runs"].get("tiled")
    if tiled is not None:
        print()
        print(f"tiled, per tile (iteration {tiled['step']}, the median; mean over ranks):")
        print(format_tiles(tiled))
    print()
    if "speedup" in summary:
        print(f"speedup {summary['speedup']:.2f}x (sequential / tiled block time, median of {repeats} "
              f"recorded iterations)")
    elif "note" in summary:
        print(summary["note"])
    print("wrote " + ", ".join(paths))
    if "timeline.png" not in files:
        print(f"timeline.png {summary['timeline_png']}")
    if torch_trace:
        print(f"torch.profiler traces: {os.path.join(out, 'torch_trace_rank<N>.json')}")


def add_parser(sub) -> None:
    pr = sub.add_parser("profile", help="record when each tile computed and communicated: Chrome trace, PNG "
                                        "timeline, overlap metrics")
    add_rank_options(pr)
    add_shape_options(pr)
    add_link_options(pr)
    add_timing_options(pr)
    g = pr.add_argument_group("profile")
    g.add_argument("--out", default="profile_out", help="output directory (default ./profile_out)")
    g.add_argument("--compare", action="store_true",
                   help="put the sequential block (1 tile) beside the tiled one in the trace and the PNG")
    g.add_argument("--torch-profiler", action="store_true",
                   help="also run one tiled call under torch.profiler, our spans as record_function ranges "
                        "(torch_trace_rank<N>.json per rank)")
    pr.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    launch = launch_from_args(args)
    cfg = BlockConfig.from_args(args, launch)
    # Fail on a bad --out before any rank starts (only where the files will be written).
    out = out_dir(args.out) if launch_rank() == 0 else os.path.abspath(args.out)
    opts = {"out": out, "torch_profiler": args.torch_profiler}
    result = run_job(profile_rank, launch, (cfg, opts), check_world=cfg.check_shape, label="profile")
    if result is None:  # not rank 0 under a launcher
        return 0
    prof = result["profile"]
    files, summary = render(prof, args.compare, {k: v for k, v in asdict(cfg).items() if k != "extra"})
    paths = write_outputs(out, files)
    print_report(prof, summary, files, paths, cfg.describe(), cfg.tiles, cfg.repeats, bool(result.get("torch_trace")),
                 out)
    return 0
