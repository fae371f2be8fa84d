"""``fastattn-dist tune``: measure what tiles cost on this GPU and store it where ``tiles="auto"`` reads it.

For each shape, the block runs with comm off (``NoComm``: compute alone, one rank's shape of the TP
group) under CUDA-graph replay, once per candidate plan (for 1..max tiles, the plan the cost model
would use with that count); each plan's median compute time, the max over ranks, goes into a JSON
file (``--out``, default ``$FASTATTN_TUNED_PROFILE`` or ``~/.cache/fastattn_dist/tuned.json``). The
cost model then simulates those plans with their measured times and the comm model (tuning/), so a
plan whose measured tile tax exceeds the comm it hides is not chosen.

Every rank computes the same plan only if every rank reads the same file: keep it on a shared file
system or copy it to every node (the CLI's cross-rank check names ranks whose plans differ).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..block import TPAttention
from ..masks import Causal
from ..parallel.comm import NoComm
from ..parallel.graphs import capture_cuda
from ..parallel.copy_engine import copy_engine_available
from ..parallel.emulated_comm import StandInAllReduce
from ..parallel.link_models import GpuLinkModel
from ..runner import job_device, max_over_ranks, median_ms, run_job
from ..tuning.cost_model import BlockCost, TilePlanOptions, plans_to_time, profile_for, simulate, tile_streams_for
from ..models.bench_model import BenchModelOptions, tune_model
from ..models.presets import SHAPES, model_config, resolve_model
from ..tuning.measured import ENV, check_profile_writable, profile_path, shape_key, store
from .options import DTYPES, add_rank_options, add_standin_path, launch_from_args, nonneg_int, positive_int


@dataclass(frozen=True)
class TuneOptions:
    """What every rank of ``tune`` runs: the shapes ``(hidden, heads, batch, seq)`` and how to time them."""

    grid: List[Tuple[int, int, int, int]]
    emulate_tp: Optional[int]
    dtype: str
    kv_heads: Optional[int]
    max_tiles: int
    repeats: int
    warmup: int


def tune_rank(rank: int, world: int, opts: TuneOptions) -> Optional[dict]:
    """Every rank times the candidate plans of each shape (compute alone); rank 0 returns the entries."""
    device = job_device()
    tp = opts.emulate_tp or world
    dtype = DTYPES[opts.dtype]
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    entries = {}
    for hidden, heads, batch, seq in opts.grid:
        kv = opts.kv_heads or heads
        D = hidden // heads
        g = torch.Generator().manual_seed(0)
        q = torch.randn(batch, seq, heads // tp, D, generator=g).to(device, dtype)
        k = torch.randn(batch, seq, kv // tp, D, generator=g).to(device, dtype)
        v = torch.randn(batch, seq, kv // tp, D, generator=g).to(device, dtype)
        wo = (torch.randn(hidden, heads // tp * D, generator=g) * hidden ** -0.5).to(device, dtype)
        cost = BlockCost(batch, seq, hidden, heads // tp, D, tp, q.element_size())
        mask = Causal()
        prof = profile_for(device)
        plans = plans_to_time(cost, mask, prof, TilePlanOptions(), counts=range(1, opts.max_tiles + 1))
        row_cost = cost.row_costs(mask, prof)
        timed = []
        for n, plan in plans.items():
            # each plan under the stream mode the block would run it with, captured as one graph over these
            # inputs, as bench times it (no copies into static buffers)
            streams = tile_streams_for(simulate(plan, row_cost, cost, prof, None))
            blk = TPAttention(hidden, heads, kv, dtype=dtype, device=device, comm=NoComm(tp, rank % tp),
                              tile_streams=streams)
            blk.load_o_proj_shard(wo)
            replay = capture_cuda(lambda: blk.attend(q, k, v, mask, tiles=plan))
            ms = median_ms(replay, device, opts.repeats, opts.warmup)
            timed.append({"tiles": n, "bounds": list(plan.bounds), "streams": streams, "compute_ms": ms})
            del blk, replay
        t1 = timed[0]["compute_ms"]
        log(f"[tune] TP={tp} hidden {hidden} B{batch} S{seq}: compute " +
            ", ".join(f"t={p['tiles']} {p['compute_ms']:.3f} ms (x{p['compute_ms'] / t1:.3f})" for p in timed))
        full = _time_with_comm(plans, (hidden, heads, kv, dtype, device), (q, k, v, wo), mask, opts, tp) \
            if tp > 1 else []
        if full:
            best = min(full, key=lambda p: p["ms"])
            log(f"[tune]   with comm: fastest {len(best['bounds']) - 1} tiles, {best['comm']}, {best['streams']} "
                f"streams: {best['ms']:.3f} ms (t=1 {min(p['ms'] for p in full if len(p['bounds']) == 2):.3f})")
        entries[shape_key(device, cost, mask)] = {"plans": timed, "full": full}
        del q, k, v
    return entries if rank == 0 else None


def _time_with_comm(plans: dict, block_args: tuple, inputs: tuple, mask, opts: TuneOptions, tp: int) -> list:
    """Whole blocks of every plan with each comm path (the stand-ins when emulating, else the group's paths) and
    stream mode: what the block's auto then picks from, SM contention and comm latency included."""
    hidden, heads, kv, dtype, device = block_args
    q, k, v, wo = inputs
    if opts.emulate_tp:
        paths = {"nccl": StandInAllReduce(tp, GpuLinkModel.for_world_size(tp), device),
                 "copy_engine": StandInAllReduce(tp, GpuLinkModel.for_world_size(tp, path="copy_engine"), device)}
    else:
        paths = dict.fromkeys(["nccl"] + (["copy_engine"] if copy_engine_available(device) else []))
        paths = {name: name for name in paths}
    out = []
    for n, plan in plans.items():
        for name, comm in paths.items():
            for streams in (("one",) if n == 1 else ("one", "overlap")):
                blk = TPAttention(hidden, heads, kv, dtype=dtype, device=device, comm=comm, tile_streams=streams)
                blk.load_o_proj_shard(wo)
                replay = capture_cuda(lambda: blk.attend(q, k, v, mask, tiles=plan))
                out.append({"bounds": list(plan.bounds), "comm": name, "streams": streams,
                            "ms": max_over_ranks(median_ms(replay, device, opts.repeats, opts.warmup), device)})
                del blk, replay
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="measure what tiles cost on this GPU and store it for tiles='auto'")
    add_rank_options(p, world_default=1, timeout_default=300.0)
    g = p.add_argument_group("shapes (causal; one rank's shape of the TP group)")
    g.add_argument("--emulate-tp", type=positive_int, default=None,
                   help="time one rank's shape of a TP=N group on this one GPU (default: the launcher's world size)")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=[4096, 8192], help="hidden sizes (default 4096 8192)")
    g.add_argument("--heads", type=positive_int, nargs="+", default=None,
                   help="heads per hidden size (default hidden / 128)")
    g.add_argument("--kv-heads", type=positive_int, default=None, help="kv heads (default: as many as heads)")
    g.add_argument("--seq", type=positive_int, nargs="+", default=[2048, 8192, 32768], help="sequence lengths (default 2048 8192 32768)")
    g.add_argument("--batch", type=positive_int, nargs="+", default=[1], help="batch sizes (default 1)")
    g.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="default bfloat16")
    g.add_argument("--max-tiles", type=positive_int, default=4, help="time plans of 1..N tiles (default 4)")
    g.add_argument("--repeats", type=positive_int, default=20, help="timed runs per plan (default 20)")
    g.add_argument("--warmup", type=nonneg_int, default=3, help="untimed runs per plan first (default 3)")
    g.add_argument("--out", default=None, help=f"profile file (default ${ENV} or ~/.cache/fastattn_dist/tuned.json)")
    g = p.add_argument_group("a model's prefill plans (instead of the block's)")
    g.add_argument("--model", default=None, help="one of " + ", ".join(SHAPES) + " or a checkpoint directory: time "
                   "whole prefills of a slice of its layers per plan, with the comm path it runs (the stand-in with "
                   "--emulate-tp); the model's tiles='auto' then takes the fastest")
    g.add_argument("--layers", type=positive_int, default=8, help="layers of the slice (default 8)")
    add_standin_path(g)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    launch = launch_from_args(args)
    if args.emulate_tp:
        if not torch.cuda.is_available():
            raise ValueError("--emulate-tp needs a CUDA GPU")
        launch.world_size, launch.dist_backend = 1, "nccl"
    if launch.device_type() != "cuda":
        raise ValueError("tune measures a GPU: run it on a machine with CUDA GPUs (under torchrun, or with "
                         "--emulate-tp N on one GPU)")
    if args.model:
        return _tune_model(args, launch)
    heads = args.heads or [h // 128 for h in args.hidden]
    if len(heads) != len(args.hidden):
        raise ValueError("--heads needs one value per --hidden value")
    grid = [(h, n, b, s) for h, n in zip(args.hidden, heads) for b in args.batch for s in args.seq]
    opts = TuneOptions(grid, args.emulate_tp, args.dtype, args.kv_heads, args.max_tiles, args.repeats, args.warmup)
    path = args.out or profile_path()
    check_profile_writable(path)
    return _run_and_store(tune_rank, launch, opts, path, "shapes")


def _tune_model(args, launch) -> int:
    path = resolve_model(args.model)
    model_config(path)  # a missing or partial checkpoint: one line now, not on every rank
    path_out = args.out or profile_path()
    check_profile_writable(path_out)
    opts = BenchModelOptions(path, args.model, DTYPES[args.dtype], repeats=args.repeats, warmup=args.warmup,
                             layers=args.layers, emulate_tp=args.emulate_tp,
                             standin=(GpuLinkModel.for_world_size(args.emulate_tp, path=args.standin_path)
                                      if args.emulate_tp and args.emulate_tp > 1 else None),
                             rows=[(b, s) for b in args.batch for s in args.seq],
                             tile_counts=list(range(1, args.max_tiles + 1)))
    return _run_and_store(tune_model, launch, opts, path_out, "model prompt shapes")


def _run_and_store(job, launch, opts, path: str, what: str) -> int:
    """Run the measuring job on every rank; rank 0 stores what it measured in the profile at ``path``."""
    entries = run_job(job, launch, (opts,), label="tune")
    if entries is None:
        return 0
    store(path, entries)
    print(f"fastattn-dist tune: {len(entries)} {what} written to {path}")
    return 0
