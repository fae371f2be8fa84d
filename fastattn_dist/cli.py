"""Command line: ``fastattn-dist demo | profile | bench`` (also ``python -m fastattn_dist``).

Without a launcher the CLI spawns local ranks itself (gloo on CPU). Under torchrun or mpirun it
joins the launcher's process group instead (NCCL when GPUs are visible), and rank 0 prints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, List, Optional

from .parallel.process_group import DEFAULT_TIMEOUT_S, detect_launcher, init_distributed, shutdown
from .parallel.spawn import RankFailedError, spawn_ranks


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {n}")
    return n


def _tiles(value: str):
    if value == "auto":
        return value
    try:
        return _positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"tiles must be an int >= 1 or 'auto', got {value!r}") from None


def add_block_options(p: argparse.ArgumentParser) -> None:
    """Options shared by demo and profile: world, shape, tiles, mask, dtype, link model, launcher."""
    g = p.add_argument_group("ranks")
    g.add_argument("--world-size", "-n", type=_positive_int, default=2, help="ranks to spawn (default 2; "
                   "ignored under torchrun/mpirun, which set it)")
    g.add_argument("--launcher", choices=("auto", "spawn", "env"), default="auto",
                   help="auto: join torchrun/mpirun if detected, else spawn local ranks")
    g.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None,
                   help="process-group backend (default: nccl with GPUs, else gloo)")
    g.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="timeout of every collective")
    g = p.add_argument_group("block")
    g.add_argument("--batch", type=_positive_int, default=1)
    g.add_argument("--seq", type=_positive_int, default=1024)
    g.add_argument("--hidden", type=_positive_int, default=1024)
    g.add_argument("--heads", type=_positive_int, default=16)
    g.add_argument("--kv-heads", type=_positive_int, default=4)
    g.add_argument("--tiles", type=_tiles, default="auto", help="tile count or 'auto' (default)")
    g.add_argument("--mask", default="causal", help="causal (default), none, or sliding_window:W")
    g.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    g.add_argument("--backend", default="auto", help="attention backend: auto, torch, triton, sdpa, reference")
    g.add_argument("--no-rope", action="store_true", help="skip rotary embeddings")
    g = p.add_argument_group("simulated link (CPU ranks)")
    g.add_argument("--link-latency-us", type=float, default=50.0, help="per all-reduce latency (default 50)")
    g.add_argument("--link-gbps", type=float, default=0.08,
                   help="link bus bandwidth in GB/s (default 0.08: NVLink scaled to CPU compute speed)")
    g.add_argument("--no-link", action="store_true", help="no link model: real gloo transfers only")
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--repeats", type=_positive_int, default=5)
    g.add_argument("--seed", type=int, default=0)


def config_from_args(args):
    from .demo import DemoConfig

    cfg = DemoConfig(world_size=args.world_size, batch=args.batch, seq=args.seq, hidden=args.hidden,
                     heads=args.heads, kv_heads=args.kv_heads, tiles=args.tiles, mask=args.mask,
                     dtype=args.dtype, backend=args.backend,
                     link_latency_us=0.0 if args.no_link else args.link_latency_us,
                     link_gbps=None if args.no_link else args.link_gbps,
                     rope_theta=None if args.no_rope else 10000.0, warmup=args.warmup, repeats=args.repeats,
                     seed=args.seed, verbose=not getattr(args, "json", False))
    cfg.validate()
    _check_shape(cfg)
    return cfg


def _check_shape(cfg) -> None:
    """Shape errors before any rank starts: the same ValueError every rank would raise."""
    from .parallel.sharding import TPShape

    TPShape.checked(cfg.hidden, cfg.heads, cfg.kv_heads, cfg.world_size, 0)


def run_job(job: Callable, args, cfg, extra_args=()) -> Optional[dict]:
    """Run ``job(rank, world, cfg, *extra)`` on every rank; return rank 0's result (None on other ranks)."""
    launcher = args.launcher
    if launcher == "auto":
        launcher = "env" if detect_launcher() != "none" else "spawn"
    if launcher == "spawn":
        backend = args.dist_backend or "gloo"
        cores = os.cpu_count() or 1
        if backend == "gloo" and cfg.world_size > cores:
            # each simulated device needs its own core: shared cores slow compute and gloo's threads alike,
            # and tiles="auto" (which assumes one core per rank) then over-tiles
            what = getattr(args, "command", "fastattn-dist")
            print(f"[{what}] note: {cfg.world_size} CPU ranks on {cores} cores: the simulated devices share "
                  "cores, so timings and tiles='auto' do not model separate devices", file=sys.stderr, flush=True)
        results = spawn_ranks(job, cfg.world_size, (cfg, *extra_args), backend=backend, timeout_s=args.timeout_s)
        return results[0]
    ctx = init_distributed(args.dist_backend, timeout_s=args.timeout_s)
    _share_cpu_cores(ctx)
    try:
        cfg.world_size = ctx.world_size
        _check_shape(cfg)
        res = job(ctx.rank, ctx.world_size, cfg, *extra_args)
        return res if ctx.rank == 0 else None
    finally:
        shutdown()


def _share_cpu_cores(ctx) -> None:
    """CPU ranks of one node split its cores, unless the user set OMP_NUM_THREADS (torchrun does)."""
    import os

    import torch

    if ctx.backend != "gloo" or "OMP_NUM_THREADS" in os.environ:
        return
    local = next((int(os.environ[n]) for n in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                                "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE") if n in os.environ), 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def cmd_demo(args) -> int:
    from .demo import format_table, run_rank

    cfg = config_from_args(args)
    summary = run_job(run_rank, args, cfg)
    if summary is None:  # not rank 0 under a launcher
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
        return 0
    print(f"fastattn-dist demo: {summary['world_size']} ranks ({summary['backend']}, {summary['device']}), "
          f"attention backend {summary['attention_backend']}")
    print(f"  {cfg.describe()}")
    print(f"  tile plan ({cfg.tiles}): {summary['num_tiles']} tiles over rows {summary['plan']}")
    print()
    print(format_table(summary))
    print()
    if summary["num_tiles"] == 1:
        print("note: the plan has one tile, so 'tiled' is the sequential block; their difference is noise")
    print(f"speedup {summary['speedup']:.2f}x; tiled vs sequential max |diff| {summary['tiled_vs_sequential_max_abs']:.2e}; "
          f"max rel err vs float64 reference {summary.get('max_rel_err', float('nan')):.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastattn-dist", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the TP block sequentially and tiled, check and time both")
    add_block_options(d)
    d.add_argument("--json", action="store_true", help="print one JSON object (last line) instead of the table")
    d.set_defaults(func=cmd_demo)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


# Other modules add subcommands here (profile, bench): each a function taking the subparsers object.
_EXTRA_COMMANDS: List[Callable] = []


def main(argv: Optional[List[str]] = None) -> int:
    _load_extra_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"fastattn-dist: error: {e}", file=sys.stderr)
        return 2
    except RankFailedError as e:
        print(f"fastattn-dist: {e}", file=sys.stderr)
        return 1


def _load_extra_commands() -> None:
    import importlib

    for mod in ("fastattn_dist.profiler.cli", "fastattn_dist.bench"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        if m.register not in _EXTRA_COMMANDS:
            _EXTRA_COMMANDS.append(m.register)


if __name__ == "__main__":
    sys.exit(main())
