"""``fastattn-dist bench``: the tiled block against what a user would write, in one run.

Two modes:
  real TP        under torchrun/mpirun, one GPU per rank: the all-reduce is NCCL's (and the copy-engine
                 path where it runs); on CPU it spawns gloo ranks (a code-path check, not GPU speed).
  --emulate-tp N one process on one GPU plays rank 0 of a TP=N group: that rank's shape (heads / N) and,
                 for each all-reduce, the comm stand-in (parallel/standin.py: a model, not a measurement):
                 NCCL holding its CTAs, NCCL squeezed onto few CTAs, and copy engines.
Per shape, from the same q, k, v and o_proj weight:
  baseline       SDPA (default backend) -> o_proj GEMM -> one all-reduce of the output, in sequence
  ours           tiles=1, each fixed count, auto (tiles and comm path by the cost model), per comm path,
                 and the same plans with comm off (compute alone)
Reported: times (median of repeats, CUDA events, max over ranks; every variant CUDA-graph captured on
GPUs, the baseline too), the tile tax = compute(plan) / compute(tiles=1), the speedup over the
baseline, the share of the headroom captured = (baseline - ours) / (baseline - ideal) with ideal =
max(baseline compute, all-reduce alone), and each output's error against ours tiles=1 and the baseline.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from datetime import date
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .block import TPAttention
from .masks import Causal
from .parallel.comm import NoComm
from .parallel.graphs import capture_cuda, run_eagerly
from .runner import job_device, median_ms

# (hidden, heads, batch, seq): the issue's grid; kv heads = heads unless --kv-heads
GRID = [(h, n, 1, s) for h, n in ((4096, 32), (8192, 64)) for s in (2048, 8192, 32768)] + \
       [(4096, 32, 4, 2048), (8192, 64, 4, 2048)]
QUICK_GRID = [(256, 8, 1, 192), (256, 8, 2, 301)]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _sdpa(q, k, v):
    """[B, S, H, D] in and out; PyTorch's default SDPA dispatch (cuDNN or FA2 on Hopper), causal."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def comm_paths(world: int, rank: int, device: torch.device, emulate: Optional[int], args: dict) -> Dict[str, object]:
    """The comm paths to compare: name -> what TPAttention's ``comm`` takes."""
    if emulate:
        from .parallel.standin import GpuLinkModel, StandInAllReduce
        over = {k: v for k, v in (("latency_us", args.get("standin_latency_us")),
                                  ("bus_gbps", args.get("standin_gbps"))) if v is not None}
        base = GpuLinkModel.for_world_size(emulate, **over)
        paths = {"nccl": StandInAllReduce(emulate, base, device)}
        if args.get("few_ctas"):
            paths[f"nccl_{args['few_ctas']}cta"] = StandInAllReduce(
                emulate, GpuLinkModel.for_world_size(emulate, ctas=args["few_ctas"], **over), device)
        paths["copy_engine"] = StandInAllReduce(emulate, GpuLinkModel.for_world_size(emulate, path="copy_engine",
                                                                                     **over), device)
        return paths
    from .parallel.ce_allreduce import copy_engine_available
    paths = {"nccl": "nccl"}
    if copy_engine_available(device):
        paths["copy_engine"] = "copy_engine"
    return paths


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_shape(hidden: int, heads: int, kv_heads: int, batch: int, seq: int, tile_counts: List[int], device,
                dtype, repeats: int, warmup: int, emulate: Optional[int], args: dict, log: Callable) -> dict:
    world = emulate or dist.get_world_size()
    rank = 0 if emulate else dist.get_rank()
    D = hidden // heads
    Hl, Hkvl = heads // world, kv_heads // world
    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    q = torch.randn(batch, seq, Hl, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(batch, seq, Hkvl, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(batch, seq, Hkvl, D, generator=g).to(device=device, dtype=dtype)
    wo = (torch.randn(hidden, Hl * D, generator=g) * (hidden ** -0.5)).to(device=device, dtype=dtype)
    rows = batch * seq
    # every variant is captured here as one graph over the same in-place inputs (the baseline too), so no
    # variant pays for copying inputs into a graph's static buffers
    capture = capture_cuda if device.type == "cuda" else run_eagerly
    paths = comm_paths(world, rank, device, emulate, args)

    def measure(fn) -> float:
        return median_ms(fn, device, repeats, warmup)

    # -- the baseline: what a user writes, captured as one graph too ----------------------------------
    y_base = torch.empty(rows, hidden, device=device, dtype=dtype)

    def allreduce_full(path: Optional[str]):
        if path is None:
            return lambda y: None
        if emulate:
            return paths[path].issue
        return lambda y: dist.all_reduce(y)

    def baseline_fn(path: Optional[str]):
        reduce = allreduce_full(path)

        def fn():
            a = _sdpa(q, k, v).reshape(rows, Hl * D)
            torch.matmul(a, wo.t(), out=y_base)
            reduce(y_base)
        return fn

    r = {"hidden": hidden, "heads": heads, "kv_heads": kv_heads, "batch": batch, "seq": seq, "tp": world,
         "emulated": bool(emulate), "local_heads": Hl, "runs": {}}
    base_compute_replay = capture(baseline_fn(None))
    r["baseline_compute_ms"] = measure(base_compute_replay)
    refs = {"compute": y_base.clone()}  # this rank's partial sums
    real_paths = list(paths) if emulate else ["nccl"]  # the baseline's all-reduce is NCCL's under real TP
    for path in real_paths:
        replay = capture(baseline_fn(path))
        r[f"baseline_{path}_ms"] = measure(replay)
        if path == "nccl":
            baseline_fn(path)()
            refs["full"] = y_base.clone()  # all-reduced (under emulation the stand-in leaves the partials)
        if emulate:
            y = torch.empty(rows, hidden, device=device, dtype=dtype)
            one = capture(lambda path=path, y=y: paths[path].issue(y))
            r[f"allreduce_{path}_ms"] = measure(one)
        else:
            y = torch.randn(rows, hidden, device=device).to(dtype)
            r[f"allreduce_{path}_ms"] = measure(capture(lambda y=y: dist.all_reduce(y)))
    r["baseline_ms"] = r["baseline_nccl_ms"]

    # -- ours --------------------------------------------------------------------------------------------
    def block_for(comm, tile_streams: str) -> TPAttention:
        blk = TPAttention(hidden, heads, kv_heads, dtype=dtype, device=device, comm=comm,
                          backend=args.get("attn_backend", "auto"), tile_streams=tile_streams)
        blk.load_o_proj_shard(wo)
        return blk

    mode = args.get("tile_streams", "auto")
    compute_blk = block_for(NoComm(world, rank), mode)
    t1_out = {}
    plans = {}
    auto_comm = dict(paths) if emulate else "auto"  # the stand-ins to choose from, or the block's own choice
    variants = [("compute", None, mode)] + [(n, c, mode) for n, c in paths.items()] + [("auto", auto_comm, mode)]
    for other in args.get("compare_streams") or []:  # the same fixed tile counts under other stream modes
        variants += [(f"compute.{other}", None, other)] + [(f"{n}.{other}", c, other) for n, c in paths.items()
                                                         if not n.startswith("nccl_")]
    for name, comm, streams in variants:
        blk = compute_blk if name == "compute" else block_for(NoComm(world, rank) if comm is None else comm, streams)
        counts = [1, *tile_counts, "auto"] if name != "auto" else ["auto"]
        if "." in name:
            counts = list(tile_counts) + ([] if comm is None else ["auto"])
        for tiles in counts:
            label = f"{name}_t{tiles}"
            try:
                if comm is None and tiles == "auto":
                    continue  # compute of auto's plans is timed below, per comm path
                y = blk.attend(q, k, v, Causal(), tiles=tiles).reshape(rows, hidden).clone()
                kind = "compute" if comm is None else "full"  # partial sums, or all-reduced outputs
                t1_out.setdefault(kind, y)
                ms = measure(capture(lambda: blk.attend(q, k, v, Causal(), tiles=tiles)))
                plan = blk.last_plan
                r["runs"][label] = {"ms": ms, "tiles": plan.num_tiles, "plan": list(plan.bounds),
                                    "comm": blk.last_comm, "streams": blk.last_streams,
                                    "err_vs_t1": _rel(y, t1_out[kind]),
                                    "err_vs_baseline": _rel(y, refs[kind])}
                if tiles == "auto":
                    plans[label] = (plan, blk.last_streams)
            except Exception as e:  # one failing variant must not hide the others
                r["runs"][label] = {"error": f"{type(e).__name__}: {e}"[:300]}
        if blk is not compute_blk:
            del blk
    # compute alone of the plans auto chose
    for label, (plan, streams) in plans.items():  # compute alone, the same plan and stream mode
        blk = block_for(NoComm(world, rank), streams)
        ms = measure(capture(lambda: blk.attend(q, k, v, Causal(), tiles=plan)))
        r["runs"][label]["compute_ms"] = ms
    # the baseline again at the end: the two readings bound the run-to-run spread of this shape
    r["baseline_compute_ms_again"] = measure(base_compute_replay)
    r["tile_streams"] = mode
    return summarize(r, tile_counts)


def summarize(r: dict, tile_counts: List[int]) -> dict:
    runs = r["runs"]
    t1c = runs.get("compute_t1", {}).get("ms")
    for label, v in runs.items():
        if "ms" not in v or t1c is None:
            continue
        name, tiles_key = label.rsplit("_t", 1)
        kind = "compute" + (name[name.index("."):] if "." in name else "")  # compute under the same stream mode
        comp = v.get("compute_ms", runs.get(f"{kind}_t{tiles_key}", {}).get("ms"))
        if comp is not None and not label.startswith("compute"):
            v["compute_ms"] = comp
        if comp is not None:
            v["tile_tax"] = comp / t1c
    base = r["baseline_ms"]
    ideal = max(r["baseline_compute_ms"], r.get("allreduce_nccl_ms", 0.0))
    r["ideal_ms"] = ideal
    auto = runs.get("auto_tauto", {})
    if "ms" in auto:
        r["auto_ms"], r["auto_speedup"] = auto["ms"], base / auto["ms"]
        head = base - ideal
        r["auto_headroom_captured"] = (base - auto["ms"]) / head if head > 1e-9 else None
        r["auto_tile_tax"] = auto.get("tile_tax")
    ok = {n: v for n, v in runs.items() if "ms" in v and not n.startswith("compute")}
    if ok:
        best = min(ok, key=lambda n: ok[n]["ms"])
        r["best_variant"], r["best_ms"], r["best_speedup"] = best, ok[best]["ms"], base / ok[best]["ms"]
    base_c = (r["baseline_compute_ms"] + r.get("baseline_compute_ms_again", r["baseline_compute_ms"])) / 2
    r["t1_vs_baseline_compute"] = base_c / t1c if t1c else None
    errs = [v[k] for v in runs.values() for k in ("err_vs_t1",) if k in v]
    r["max_err_vs_t1"] = max(errs) if errs else None
    r["max_err_vs_baseline"] = max((v["err_vs_baseline"] for v in runs.values() if "err_vs_baseline" in v), default=None)
    return r


def run_rank(rank: int, world: int, opts: dict) -> Optional[List[dict]]:
    device = job_device()
    if opts["emulate_tp"] and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[opts["dtype"]]
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    results = []
    for hidden, heads, batch, seq in opts["grid"]:
        kv = opts.get("kv_heads") or heads
        r = bench_shape(hidden, heads, kv, batch, seq, opts["tile_counts"], device, dtype, opts["repeats"],
                        opts["warmup"], opts["emulate_tp"], opts, log)
        results.append(r)
        if rank == 0 and opts.get("partial_path"):  # what is done survives a run cut short
            with open(opts["partial_path"], "w") as f:
                json.dump({"partial": True, "results": results}, f)
        log(f"[bench] TP={r['tp']} hidden {hidden} B{batch} S{seq}: baseline {r['baseline_ms']:.3f} ms "
            f"(compute {r['baseline_compute_ms']:.3f}), ours t=1 compute x{1 / r['t1_vs_baseline_compute']:.3f}, "
            f"auto {r.get('auto_ms', float('nan')):.3f} ms ({r.get('auto_speedup', float('nan')):.2f}x, "
            f"tax {r.get('auto_tile_tax') or float('nan'):.3f})")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results if rank == 0 else None


def comm_label(path: str, meta: dict) -> str:
    """A comm path as the reader should see it: the process group's all-reduce is named by its backend (gloo on
    CPU ranks), a stand-in says it is one."""
    if path == "nccl":
        return "nccl stand-in" if meta["emulated"] else meta["backend"]
    return f"{path} stand-in" if meta["emulated"] else path


def markdown(results: List[dict], meta: dict) -> str:
    smoke = not meta["gpu"]
    lines = [f"Command: `{meta['command']}`  ", f"Device: {meta['device']}; torch {meta['torch']}; {meta['dtype']}, "
             f"causal; date {meta['date']}; {meta['mode']}; comm: {meta['comm']}  ",
             *(["**A CPU smoke run: it checks the code path on gloo ranks; its times and ratios are not a measurement "
                "of anything.**  "] if smoke else []),
             f"Times in ms: median of repeats, {meta['timer']}, max over ranks. "
             "Baseline: SDPA (default backend) + o_proj GEMM + one all-reduce, in sequence, same run. "
             "compute = the same plan with comm off; tax = compute(plan) / compute(t=1); captured = share of "
             "(baseline - ideal) recovered, ideal = max(baseline compute, all-reduce alone).", "",
             "| TP | hidden/heads | B | S | baseline | baseline compute | all-reduce | ours t=1 compute / baseline compute"
             " | t=1 | " + " | ".join(f"t={n} (tax)" for n in meta["tile_counts"]) +
             " | auto: comm, tiles | auto (tax) | auto speedup | captured | max rel err |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(meta["tile_counts"]) + "---|---|---|---|---|"]
    for r in results:
        runs = r["runs"]
        comm = "nccl"

        def cell(label):
            v = runs.get(label, {})
            if "ms" not in v:
                return "err"
            tax = v.get("tile_tax")
            return f"{v['ms']:.3f}" + (f" ({tax:.3f})" if tax is not None else "")
        auto = runs.get("auto_tauto", {})
        cap = r.get("auto_headroom_captured")
        lines.append(
            f"| {r['tp']} | {r['hidden']}/{r['heads']} | {r['batch']} | {r['seq']} | {r['baseline_ms']:.3f} | "
            f"{r['baseline_compute_ms']:.3f} | {r.get('allreduce_nccl_ms', float('nan')):.3f} | "
            f"{1 / r['t1_vs_baseline_compute']:.3f} | {cell(f'{comm}_t1')} | "
            + " | ".join(cell(f"{comm}_t{n}") for n in meta["tile_counts"])
            + f" | {comm_label(auto.get('comm', '-'), meta)}, {auto.get('tiles', '-')} | {cell('auto_tauto')} | "
              f"{r.get('auto_speedup', float('nan')):.2f}x | {'-' if cap is None or smoke else f'{cap:.0%}'} | "
              f"{max(r['max_err_vs_t1'] or 0, r['max_err_vs_baseline'] or 0):.1e} |")
    return "\n".join(lines) + "\n"


def cmd_bench(args) -> int:
    from .cli import launch_from_args
    from .profiler.export import check_writable
    from .runner import run_job

    launch = launch_from_args(args)
    if not args.quick and not args.emulate_tp and launch.device_type() != "cuda":
        raise ValueError("bench's grid is GPU-sized (hidden 4096 and 8192, S up to 32K): these ranks run on CPU, where "
                         "it would take hours; use --quick (a smoke run of the code path), or run on GPUs")
    grid = QUICK_GRID if args.quick else GRID
    if args.seq:
        grid = list(dict.fromkeys((h, n, b, s) for (h, n, b, _) in grid for s in args.seq))
    if args.hidden:
        grid = [g for g in grid if g[0] in args.hidden]
    if args.batch:
        grid = [g for g in grid if g[2] in args.batch]
    if not grid:
        raise ValueError("no shape left in the grid after --seq/--hidden/--batch")
    if args.emulate_tp:
        if not torch.cuda.is_available():
            raise ValueError("--emulate-tp needs a CUDA GPU (the comm stand-in is a GPU kernel)")
        launch.world_size, launch.dist_backend = 1, "nccl"
        heads = {g[1] for g in grid} | ({args.kv_heads} if args.kv_heads else set())
        bad = sorted(h for h in heads if h % args.emulate_tp)
        if bad:
            raise ValueError(f"heads {bad} are not divisible by --emulate-tp {args.emulate_tp}")
    opts = {"grid": grid, "tile_counts": args.tile_counts, "dtype": args.dtype, "repeats": args.repeats,
            "warmup": args.warmup, "kv_heads": args.kv_heads, "emulate_tp": args.emulate_tp,
            "attn_backend": args.attn_backend, "few_ctas": args.few_ctas, "compare_streams": args.compare_streams,
            "tile_streams": args.tile_streams,
            "standin_latency_us": args.standin_latency_us, "standin_gbps": args.standin_gbps,
            "partial_path": os.path.join(args.out, f"bench_partial_tp{args.emulate_tp or 'x'}.json")
            if args.out else None}
    if args.out:
        check_writable(args.out)
    results = run_job(run_rank, launch, (opts,), label="bench")
    if results is None:
        return 0
    gpu = torch.cuda.is_available() and launch.device_type() == "cuda"
    meta = {"command": "fastattn-dist " + " ".join(sys.argv[1:]), "dtype": args.dtype, "torch": torch.__version__,
            "date": date.today().isoformat(), "tile_counts": args.tile_counts,
            "timer": "CUDA events over CUDA-graph replays (the baseline's too)" if gpu else "host clock, eager",
            "mode": (f"emulated TP={args.emulate_tp} on one GPU (comm: the modelled stand-in)" if args.emulate_tp
                     else f"real TP={results[0]['tp']}"),
            "device": torch.cuda.get_device_name(0) if gpu else (platform.processor() or "CPU"), "gpu": gpu,
            "emulated": bool(args.emulate_tp), "backend": "nccl" if gpu else "gloo"}
    meta["comm"] = ("the modelled stand-in (not a measurement of comm)" if args.emulate_tp
                    else f"{meta['backend']} (the process group's all-reduce)")
    md = markdown(results, meta)
    print(md)
    if args.out:
        name = f"bench_tp{results[0]['tp']}{'_emulated' if args.emulate_tp else ''}"
        with open(os.path.join(args.out, name + ".md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


def add_parser(sub) -> None:
    from .cli import add_rank_options, nonneg_int, positive_float, positive_int

    p = sub.add_parser("bench", help="time the tiled block against SDPA + GEMM + all-reduce (GPUs: torchrun, or "
                                     "--emulate-tp N on one GPU)")
    add_rank_options(p, timeout_default=300.0)
    g = p.add_argument_group("grid (causal; hidden 4096/32 heads and 8192/64 heads, S 2K/8K/32K, batch 1, and 4 x 2K)")
    g.add_argument("--quick", action="store_true", help="two tiny shapes (a CPU smoke run of the code path)")
    g.add_argument("--seq", type=positive_int, nargs="*", help="only these sequence lengths")
    g.add_argument("--hidden", type=positive_int, nargs="*", help="only these hidden sizes of the grid")
    g.add_argument("--batch", type=positive_int, nargs="*", help="only these batch sizes of the grid")
    g.add_argument("--kv-heads", type=positive_int, default=None, help="kv heads (default: as many as heads)")
    g.add_argument("--tile-counts", type=positive_int, nargs="*", default=[2, 3, 4], help="fixed tile counts to time (default 2 3 4)")
    g.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="default bfloat16")
    g.add_argument("--tile-streams", default="auto", choices=("auto", "one", "overlap", "staged", "lead"),
                   help="how our tiles share the GPU (row_parallel.py; default auto: per shape)")
    g.add_argument("--compare-streams", nargs="*", default=None, choices=("one", "overlap", "staged", "lead"),
                   help="also time the fixed tile counts and auto's plans under these stream modes")
    g.add_argument("--attn-backend", default="auto", choices=("auto", "triton", "cudnn", "torch"),
                   help="our block's attention kernel (the baseline always uses SDPA's default)")
    g = p.add_argument_group("one-GPU TP emulation")
    g.add_argument("--emulate-tp", type=positive_int, default=None,
                   help="play rank 0 of a TP=N group on this one GPU, all-reduces replaced by the comm stand-in")
    g.add_argument("--few-ctas", type=nonneg_int, default=4,
                   help="also time the stand-in NCCL path squeezed onto this many CTAs (default 4; 0: off)")
    g.add_argument("--standin-latency-us", type=positive_float, default=None,
                   help="override the stand-in's all-reduce latency (default: the fit for the TP size)")
    g.add_argument("--standin-gbps", type=positive_float, default=None,
                   help="override the stand-in's bus bandwidth in GB/s (default: the fit for the TP size)")
    g = p.add_argument_group("timing and output")
    g.add_argument("--repeats", type=positive_int, default=20, help="timed runs per variant (default 20)")
    g.add_argument("--warmup", type=nonneg_int, default=3, help="untimed runs per variant first (default 3)")
    g.add_argument("--out", default=None, help="folder for bench_tp<N>[_emulated].md and .json")
    p.set_defaults(func=cmd_bench)
