"""``fastattn-dist demo``, the main job: one TP attention block, run sequentially and with tiling-AllReduce,
checked and timed.

``run_rank`` is what every rank executes (spawned locally, or under torchrun / mpirun); rank 0's
return value carries the summary. Exposed comm is the profiler's: all-reduce time on a rank not
covered by that rank's compute (profiler/metrics.py), from one recorded call per run.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from ..profiler.metrics import format_table as table, rank_step_metrics
from ..recorder import SpanRecorder
from ..reference_block import reference_block
from ..runner import max_over_ranks, run_job, time_ms
from .block_job import BlockConfig, start_rank
from .options import add_link_options, add_rank_options, add_shape_options, add_timing_options, launch_from_args


def recorded_call(block, x, mask, tiles) -> dict:
    """One call with a recorder attached: this rank's block, compute and exposed-comm times (ms)."""
    rec = SpanRecorder(block.rank, x.device)
    block.recorder = rec
    try:
        block(x, mask=mask, tiles=tiles)
    finally:
        block.recorder = None
    m = rank_step_metrics(rec.spans())
    return {"block_ms": m["block_us"] / 1e3, "compute_ms": m["compute_us"] / 1e3,
            "exposed_comm_ms": m["exposed_comm_us"] / 1e3}


def run_rank(rank: int, world_size: int, cfg: BlockConfig) -> dict:
    """Everything one rank does for the demo. Needs the process group initialised (any launcher)."""
    w = start_rank(cfg, rank, world_size, "demo")
    device, log, mask, block, x, weights, plan = w.device, w.log, w.mask, w.block, w.x, w.weights, w.plan
    results, outputs = {}, {}
    for name, tiles in (("sequential", 1), ("tiled", cfg.tiles)):
        if log:
            log(f"[demo] timing {name} ({cfg.warmup} warm-up, {cfg.repeats} timed)")
        outputs[name] = block(x, mask=mask, tiles=tiles).clone()
        t_last = [time.monotonic()]

        def progress(i: int, n: int, ms: float) -> None:
            if log and (time.monotonic() - t_last[0] > 2.0 or i == n):  # a line every few seconds on long runs
                t_last[0] = time.monotonic()
                log(f"[demo]   {name}: {i}/{n} repeats, last {ms:.2f} ms")

        times = time_ms(lambda: block(x, mask=mask, tiles=tiles), device, cfg.repeats, cfg.warmup, progress)
        rec = recorded_call(block, x, mask, tiles)
        results[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                         "times_ms": times, "compute_ms": max_over_ranks(rec["compute_ms"], device),
                         "exposed_comm_ms": max_over_ranks(rec["exposed_comm_ms"], device)}
    seq, til = results["sequential"], results["tiled"]
    summary = {
        "world_size": world_size, "backend": torch.distributed.get_backend(), "device": str(device),
        "attention_backend": block.backend, "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "plan": list(plan.bounds), "num_tiles": plan.num_tiles,
        "auto_chose_one_tile": cfg.tiles == "auto" and plan.num_tiles == 1,
        "sequential_ms": seq["median_ms"], "tiled_ms": til["median_ms"],
        # one rank (no comm) or one tile (the same block twice): the ratio would be noise, not a speedup
        "speedup": seq["median_ms"] / til["median_ms"] if world_size > 1 and plan.num_tiles > 1 else None,
        "sequential_exposed_comm_ms": seq["exposed_comm_ms"], "tiled_exposed_comm_ms": til["exposed_comm_ms"],
        "sequential_compute_ms": seq["compute_ms"], "tiled_compute_ms": til["compute_ms"],
        # run-to-run spread of the timed repeats: ratios of medians are only as good as this
        "spread": {n: {k: r[k] for k in ("min_ms", "median_ms", "max_ms")} for n, r in results.items()},
        "runs": results,
    }
    summary["tiled_vs_sequential_max_abs"] = (outputs["tiled"].double() - outputs["sequential"].double()).abs().max().item()
    if cfg.check and rank == 0:
        if log:
            log("[demo] checking both runs against the float64 single-device reference (--no-check skips it)")
        with reference_progress(cfg.seq, enabled=log is not None) as progress:
            ref = reference_block(x, *weights, cfg.heads, cfg.kv_heads, mask=mask, rope_theta=cfg.rope_theta,
                                  progress=progress)
        scale = ref.abs().max().item()
        for name, out in outputs.items():
            summary[f"{name}_max_rel_err"] = (out.cpu().double() - ref).abs().max().item() / scale
        summary["max_rel_err"] = max(summary["sequential_max_rel_err"], summary["tiled_max_rel_err"])
    return summary


@contextlib.contextmanager
def reference_progress(rows: int, enabled: bool):
    """A progress bar (stderr, rank 0) over the reference's query rows; shown only if it runs for more than 2 s."""
    if not enabled:
        yield None
        return
    with tqdm(total=rows, desc="[demo] float64 reference", unit="rows", file=sys.stderr, delay=2.0,
              mininterval=1.0, leave=False) as bar:
        yield bar.update


def format_table(s: dict) -> str:
    rows = [("run", "tiles", "median ms", "min-max ms", "exposed comm ms", "speedup", "max rel err vs fp64")]
    for name, tiles in (("sequential", 1), ("tiled", s["num_tiles"])):
        err = s.get(f"{name}_max_rel_err")
        spread = s["spread"][name]
        speed = "-" if s["speedup"] is None else f"{s['sequential_ms'] / s[name + '_ms']:.2f}x"
        rows.append((name, str(tiles), f"{s[name + '_ms']:.2f}", f"{spread['min_ms']:.2f}-{spread['max_ms']:.2f}",
                     f"{s[name + '_exposed_comm_ms']:.2f}", speed, "-" if err is None else f"{err:.2e}"))
    return table(rows)


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="run the TP block sequentially and tiled, check and time both")
    add_rank_options(d)
    add_shape_options(d)
    add_link_options(d)
    add_timing_options(d)
    d.add_argument("--json", action="store_true", help="print one JSON object (last line) instead of the table")
    d.add_argument("--no-check", action="store_true", help="skip the float64 reference check")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    launch = launch_from_args(args)
    cfg = BlockConfig.from_args(args, launch)
    summary = run_job(run_rank, launch, (cfg,), check_world=cfg.check_shape, label="demo")
    if summary is None:  # not rank 0 under a launcher
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
        return 0
    print(f"fastattn-dist demo: {summary['world_size']} ranks ({summary['backend']}, {summary['device']}), "
          f"attention backend {summary['attention_backend']}"
          + ("" if cfg.attn_precision == "bf16" else f", {cfg.attn_precision} attention"))
    print(f"  {cfg.describe()}")
    print(f"  tile plan ({cfg.tiles}): {summary['num_tiles']} tiles over rows {summary['plan']}")
    print()
    print(format_table(summary))
    print()
    err = summary.get("max_rel_err")
    check = "not checked (--no-check)" if err is None else f"max rel err vs float64 reference {err:.2e}"
    if summary["world_size"] == 1:
        print("note: one rank: there is no comm to hide, so 'tiled' only shows what tiles cost")
    elif summary["auto_chose_one_tile"]:
        print("note: tiles=auto chose one tile (the cost model predicts no gain worth tiling for at this shape), so "
              "'tiled' is the sequential block: no speedup to show")
    elif summary["num_tiles"] == 1:
        print("note: the plan has one tile, so 'tiled' is the sequential block: no speedup to show")
    if summary["speedup"] is not None:
        print(f"speedup {summary['speedup']:.2f}x; ", end="")
    print(f"tiled vs sequential max |diff| {summary['tiled_vs_sequential_max_abs']:.2e}; {check}")
    return 0
