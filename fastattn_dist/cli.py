"""Command line: ``fastattn-dist demo | profile | bench | tune | generate | bench-model`` (also
``python -m fastattn_dist``).

Without a launcher the CLI spawns local ranks itself (gloo on CPU). Under torchrun or mpirun it
joins the launcher's process group instead (NCCL when GPUs are visible), and rank 0 prints. Every
value is checked before any rank starts: a bad one is a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Callable, List, Optional

from .parallel.process_group import DEFAULT_TIMEOUT_S, RendezvousError
from .parallel.spawn import RankFailedError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {n}")
        return n
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value}")
    return x


def tiles_arg(value: str):
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"tiles must be an int >= 1 or 'auto', got {value!r}") from None


# -- option groups shared by the subcommands ---------------------------------------------------------
def add_rank_options(p: argparse.ArgumentParser, world_default: int = 2, timeout_default: float = DEFAULT_TIMEOUT_S):
    g = p.add_argument_group("ranks")
    g.add_argument("--world-size", "-n", type=positive_int, default=world_default,
                   help=f"ranks to spawn (default {world_default}; under torchrun/mpirun the launcher sets it)")
    g.add_argument("--launcher", choices=("auto", "spawn", "env"), default="auto",
                   help="auto (default): join torchrun/mpirun/Slurm if detected, else spawn local ranks; env: require "
                        "a launcher; spawn: always spawn local ranks")
    g.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None,
                   help="process-group backend (default: nccl under a launcher with GPUs, else gloo)")
    g.add_argument("--timeout-s", type=positive_float, default=timeout_default,
                   help=f"timeout of rendezvous and of every collective, in seconds (default {timeout_default:g})")


def add_shape_options(p: argparse.ArgumentParser, seq_default: int = 1024, dtype_default: str = "float32"):
    g = p.add_argument_group("block")
    g.add_argument("--batch", type=positive_int, default=1, help="sequences per call (default 1)")
    g.add_argument("--seq", type=positive_int, default=seq_default, help=f"tokens per sequence (default {seq_default})")
    g.add_argument("--hidden", type=positive_int, default=1024, help="hidden size (default 1024)")
    g.add_argument("--heads", type=positive_int, default=16, help="attention heads (default 16)")
    g.add_argument("--kv-heads", type=positive_int, default=4, help="kv heads (GQA; default 4)")
    g.add_argument("--tiles", type=tiles_arg, default="auto", help="tile count, or auto (the cost model; default)")
    g.add_argument("--mask", default="causal", help="causal (default), none, or sliding_window:W")
    g.add_argument("--dtype", default=dtype_default, help=f"float32, bfloat16, float16 (default {dtype_default})")
    g.add_argument("--attn-backend", default="auto",
                   help="attention kernel: auto (default: cudnn on Hopper, triton on other GPUs, torch on CPU), "
                        "torch, triton, cudnn, sdpa, reference")
    g.add_argument("--no-rope", action="store_true", help="skip rotary embeddings")


def add_link_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("simulated link (CPU ranks)")
    g.add_argument("--link-latency-us", type=float, default=50.0, help="per all-reduce latency in us (default 50)")
    g.add_argument("--link-gbps", type=float, default=0.08,
                   help="link bus bandwidth in GB/s (default 0.08: NVLink scaled to CPU compute speed)")
    g.add_argument("--no-link", action="store_true", help="no link model: real gloo transfers only")


def add_timing_options(p: argparse.ArgumentParser, repeats: int = 5, warmup: int = 1):
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=nonneg_int, default=warmup, help=f"untimed calls first (default {warmup})")
    g.add_argument("--repeats", type=positive_int, default=repeats, help=f"timed calls (default {repeats})")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and input (default 0)")


def launch_from_args(args):
    from .runner import Launch

    return Launch(args.world_size, args.launcher, args.dist_backend, args.timeout_s)


def block_config(args, launch):
    from .runner import launch_world_size
    from .workload import BlockConfig

    cfg = BlockConfig(world_size=launch_world_size(launch), batch=args.batch, seq=args.seq, hidden=args.hidden,
                      heads=args.heads, kv_heads=args.kv_heads, tiles=args.tiles, mask=args.mask,
                      dtype=args.dtype, attn_backend=args.attn_backend,
                      link_latency_us=0.0 if args.no_link else args.link_latency_us,
                      link_gbps=None if args.no_link else args.link_gbps,
                      rope_theta=None if args.no_rope else 10000.0, warmup=args.warmup, repeats=args.repeats,
                      seed=args.seed, check=not getattr(args, "no_check", False),
                      verbose=not getattr(args, "json", False))
    cfg.validate(launch.device_type())
    return cfg


# -- subcommands ---------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .demo import format_table, run_rank
    from .runner import run_job

    launch = launch_from_args(args)
    cfg = block_config(args, launch)
    summary = run_job(run_rank, launch, (cfg,), check_world=cfg.check_shape, label="demo")
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


def cmd_profile(args) -> int:
    from .profiler.export import check_writable, write_outputs
    from .profiler.job import profile_rank
    from .profiler.report import print_report, render
    from .runner import launch_rank, run_job

    launch = launch_from_args(args)
    cfg = block_config(args, launch)
    # Fail on a bad --out before any rank starts (only where the files will be written).
    out = check_writable(args.out) if launch_rank() == 0 else os.path.abspath(args.out)
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


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fastattn-dist", description="Tensor-parallel attention with tiling-AllReduce: "
                                "demo, profile, bench and tune the TP block; generate with and bench the TP Llama-family model.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"fastattn-dist {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the TP block sequentially and tiled, check and time both")
    add_rank_options(d)
    add_shape_options(d)
    add_link_options(d)
    add_timing_options(d)
    d.add_argument("--json", action="store_true", help="print one JSON object (last line) instead of the table")
    d.add_argument("--no-check", action="store_true", help="skip the float64 reference check")
    d.set_defaults(func=cmd_demo)

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

    from . import bench, tune
    from .models import commands as model_commands
    bench.add_parser(sub)
    tune.add_parser(sub)
    model_commands.add_generate_parser(sub)
    model_commands.add_bench_model_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .runner import PreflightDone

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PreflightDone:
        return 0
    except (ValueError, TypeError) as e:
        print(f"fastattn-dist: error: {e}", file=sys.stderr)
        return 2
    except (RankFailedError, RendezvousError) as e:
        print(f"fastattn-dist: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastattn-dist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
