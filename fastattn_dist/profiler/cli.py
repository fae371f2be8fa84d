"""``fastattn-dist profile``: record the block on every rank, write trace.json, timeline.png, metrics.json.

Loaded by ``fastattn_dist.cli`` (its ``_EXTRA_COMMANDS`` hook calls ``register``). The output
directory is checked before any rank starts; the files are rendered in memory from validated
metrics and only then written (temporary names, then renamed), so a failed run leaves no
half-written or stale-looking set behind.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from ..cli import add_block_options, config_from_args, run_job
from .export import check_writable, chrome_trace, dumps, write_outputs
from .gather import Profile
from .metrics import compute_metrics, format_runs, format_tiles

def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="record when each tile computed and communicated: Chrome trace, "
                                              "PNG timeline, overlap metrics")
    add_block_options(p)
    g = p.add_argument_group("profile")
    g.add_argument("--out", default="profile_out", help="output directory (default ./profile_out)")
    g.add_argument("--compare", action="store_true",
                   help="put the sequential block (1 tile) beside the tiled one in the trace and the PNG")
    g.add_argument("--torch-profiler", action="store_true",
                   help="also run one tiled call under torch.profiler, our spans as record_function ranges "
                        "(torch_trace_rank<N>.json per rank)")
    p.set_defaults(func=cmd_profile)


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (0 when spawning locally)."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return 0


def title_for(prof: Profile, metrics: dict) -> str:
    meta = prof.meta
    runs = metrics["runs"]
    head = f"TP attention, {prof.world_size} ranks ({prof.backend}, {meta.get('device', '?')}): {meta.get('describe', '')}"
    if "speedup" in metrics:
        tail = (f"tiled ({runs['tiled']['tiles']} tiles) {runs['tiled']['block_ms']:.2f} ms vs sequential "
                f"{runs['sequential']['block_ms']:.2f} ms: speedup {metrics['speedup']:.2f}x")
    else:
        tail = ", ".join(f"{r} {m['block_ms']:.2f} ms" for r, m in runs.items())
    return f"{head}\n{tail}"


def render(prof: Profile, compare: bool, config: dict) -> Tuple[Dict[str, bytes], dict]:
    """The files' bytes and the metrics, from a gathered profile (validated here).

    matplotlib is optional (the ``plot`` extra): without it there is no timeline.png, and
    metrics.json and the printed report say so.
    """
    metrics = compute_metrics(prof.spans, prof.world_size)
    shown: List[str] = [r for r in prof.runs() if compare or r == "tiled"] or prof.runs()
    title = title_for(prof, metrics)
    try:
        from .plot import timeline_png

        png, png_note = timeline_png(prof, metrics, shown, title), "timeline.png"
    except ImportError as e:
        png, png_note = None, f"not written: matplotlib is not importable ({e}); pip install matplotlib"
    summary = {"world_size": prof.world_size, "backend": prof.backend, **prof.meta, "config": config,
               "shown_runs": shown, "timeline_png": png_note,
               "clock_offsets": [c.to_dict() for c in prof.clocks], **metrics}
    trace = chrome_trace(prof, shown, other={"title": title, "config": config, "speedup": metrics.get("speedup")})
    files = {"trace.json": dumps(trace), "metrics.json": dumps(summary, indent=2)}
    if png is not None:
        files["timeline.png"] = png
    return files, summary


def cmd_profile(args) -> int:
    from dataclasses import asdict

    from .job import profile_rank

    cfg = config_from_args(args)
    # Fail on a bad --out before any rank starts (only where the files will be written).
    out = check_writable(args.out) if _launch_rank() == 0 else os.path.abspath(args.out)
    opts = {"out": out, "torch_profiler": args.torch_profiler}
    result = run_job(profile_rank, args, cfg, (opts,))
    if result is None:  # not rank 0 under a launcher
        return 0
    prof: Profile = result["profile"]
    config = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    files, summary = render(prof, args.compare, config)
    paths = write_outputs(out, files)
    print(f"fastattn-dist profile: {prof.world_size} ranks ({prof.backend}, {prof.meta.get('device')}), "
          f"attention backend {prof.meta.get('attention_backend')}")
    print(f"  {cfg.describe()}")
    print(f"  tile plan ({cfg.tiles}): {prof.meta.get('num_tiles')} tiles over rows {prof.meta.get('plan')}")
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
        print(f"speedup {summary['speedup']:.2f}x (sequential / tiled block time, median of {cfg.repeats} "
              f"recorded iterations)")
    print("wrote " + ", ".join(paths))
    if "timeline.png" not in files:
        print(f"timeline.png {summary['timeline_png']}")
    if result.get("torch_trace"):
        print(f"torch.profiler traces: {os.path.join(out, 'torch_trace_rank<N>.json')}")
    return 0
