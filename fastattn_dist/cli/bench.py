"""``fastattn-dist bench``: the tiled block against what a user would write, in one run.

Two modes:
  real TP        under torchrun/mpirun, one GPU per rank: the all-reduce is NCCL's (and the copy-engine
                 path where it runs); on CPU it spawns gloo ranks (a code-path check, not GPU speed).
  --emulate-tp N one process on one GPU plays rank 0 of a TP=N group: that rank's shape (heads / N) and,
                 for each all-reduce, the comm stand-in (parallel/emulated_comm.py: a model, not a measurement):
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
from dataclasses import dataclass, field
from datetime import date
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..block import TPAttention
from ..masks import Causal
from ..parallel.comm import NoComm
from ..parallel.copy_engine import copy_engine_available
from ..parallel.emulated_comm import StandInAllReduce
from ..parallel.graphs import capture_cuda, run_eagerly
from ..parallel.link_models import GpuLinkModel
from ..runner import job_device, median_ms, run_job
from .options import (DTYPES, add_rank_options, launch_from_args, nonneg_int, out_dir, positive_float,
                      positive_int)

# (hidden, heads, batch, seq): the issue's grid; kv heads = heads unless --kv-heads
GRID = [(h, n, 1, s) for h, n in ((4096, 32), (8192, 64)) for s in (2048, 8192, 32768)] + \
       [(4096, 32, 4, 2048), (8192, 64, 4, 2048)]
QUICK_GRID = [(256, 8, 1, 192), (256, 8, 2, 301)]


@dataclass(frozen=True)
class BenchOptions:
    """What every rank of ``bench`` runs: the grid ``(hidden, heads, batch, seq)``, the variants, the timing."""

    grid: List[Tuple[int, int, int, int]]
    tile_counts: List[int]
    dtype: str = "bfloat16"
    repeats: int = 20
    warmup: int = 3
    kv_heads: Optional[int] = None
    emulate_tp: Optional[int] = None
    attn_backend: str = "auto"
    few_ctas: int = 4
    compare_streams: List[str] = field(default_factory=list)
    tile_streams: str = "auto"
    standin_latency_us: Optional[float] = None
    standin_gbps: Optional[float] = None
    standin_small_latency_us: Optional[float] = None
    partial_path: Optional[str] = None

    def standin(self, **kw) -> GpuLinkModel:
        over = {k: v for k, v in (("latency_us", self.standin_latency_us), ("bus_gbps", self.standin_gbps),
                                  ("small_latency_us", self.standin_small_latency_us)) if v is not None}
        return GpuLinkModel.for_world_size(self.emulate_tp, **over, **kw)


def _sdpa(q, k, v):
    """[B, S, H, D] in and out; PyTorch's default SDPA dispatch (cuDNN or FA2 on Hopper), causal."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def comm_paths(device: torch.device, opts: BenchOptions) -> Dict[str, object]:
    """The comm paths to compare: name -> what TPAttention's ``comm`` takes."""
    if opts.emulate_tp:
        n = opts.emulate_tp
        paths = {"nccl": StandInAllReduce(n, opts.standin(), device)}
        if opts.few_ctas:
            paths[f"nccl_{opts.few_ctas}cta"] = StandInAllReduce(n, opts.standin(ctas=opts.few_ctas), device)
        paths["copy_engine"] = StandInAllReduce(n, opts.standin(path="copy_engine"), device)
        return paths
    paths = {"nccl": "nccl"}
    if copy_engine_available(device):
        paths["copy_engine"] = "copy_engine"
    return paths


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@dataclass
class ShapeRun:
    """One shape's inputs (this rank's q, k, v and o_proj shard), comm paths and timer."""

    hidden: int
    heads: int
    kv_heads: int
    batch: int
    seq: int
    world: int
    rank: int
    device: torch.device
    dtype: torch.dtype
    opts: BenchOptions

    def __post_init__(self) -> None:
        D = self.hidden // self.heads
        self.local_heads, Hkvl = self.heads // self.world, self.kv_heads // self.world
        g = torch.Generator(device="cpu").manual_seed(1234 + self.rank)
        kw = {"device": self.device, "dtype": self.dtype}
        self.q = torch.randn(self.batch, self.seq, self.local_heads, D, generator=g).to(**kw)
        self.k = torch.randn(self.batch, self.seq, Hkvl, D, generator=g).to(**kw)
        self.v = torch.randn(self.batch, self.seq, Hkvl, D, generator=g).to(**kw)
        self.wo = (torch.randn(self.hidden, self.local_heads * D, generator=g) * self.hidden ** -0.5).to(**kw)
        self.rows = self.batch * self.seq
        # every variant is captured as one graph over the same in-place inputs (the baseline too), so no variant
        # pays for copying inputs into a graph's static buffers
        self.capture = capture_cuda if self.device.type == "cuda" else run_eagerly
        self.paths = comm_paths(self.device, self.opts)
        self.result = {"hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads, "batch": self.batch,
                       "seq": self.seq, "tp": self.world, "emulated": bool(self.opts.emulate_tp),
                       "local_heads": self.local_heads, "runs": {}}
        self.refs: Dict[str, torch.Tensor] = {}

    def measure(self, fn: Callable[[], None]) -> float:
        return median_ms(self.capture(fn), self.device, self.opts.repeats, self.opts.warmup)

    def block(self, comm, tile_streams: str) -> TPAttention:
        blk = TPAttention(self.hidden, self.heads, self.kv_heads, dtype=self.dtype, device=self.device, comm=comm,
                          backend=self.opts.attn_backend, tile_streams=tile_streams)
        blk.load_o_proj_shard(self.wo)
        return blk

    def _reduce(self, path: Optional[str]) -> Callable[[torch.Tensor], None]:
        if path is None:
            return lambda y: None
        if self.opts.emulate_tp:
            return self.paths[path].issue
        return lambda y: dist.all_reduce(y)

    def baseline(self, path: Optional[str], y: torch.Tensor) -> Callable[[], None]:
        """What a user writes: SDPA, then the o_proj GEMM, then one all-reduce of the whole output."""
        reduce, D = self._reduce(path), self.hidden // self.heads

        def fn():
            a = _sdpa(self.q, self.k, self.v).reshape(self.rows, self.local_heads * D)
            torch.matmul(a, self.wo.t(), out=y)
            reduce(y)
        return fn

    def time_baselines(self) -> None:
        r, y = self.result, torch.empty(self.rows, self.hidden, device=self.device, dtype=self.dtype)
        self._base_compute = self.baseline(None, y)
        r["baseline_compute_ms"] = self.measure(self._base_compute)
        self.refs["compute"] = y.clone()  # this rank's partial sums
        for path in (list(self.paths) if self.opts.emulate_tp else ["nccl"]):  # real TP: the baseline is NCCL's
            r[f"baseline_{path}_ms"] = self.measure(self.baseline(path, y))
            if path == "nccl":
                self.baseline(path, y)()
                self.refs["full"] = y.clone()  # all-reduced (under emulation the stand-in leaves the partials)
            alone = torch.randn(self.rows, self.hidden, device=self.device).to(self.dtype)
            reduce = self._reduce(path)
            r[f"allreduce_{path}_ms"] = self.measure(lambda reduce=reduce, alone=alone: reduce(alone))
        r["baseline_ms"] = r["baseline_nccl_ms"]

    def variants(self) -> List[Tuple[str, object, str]]:
        """(name, comm or None for compute alone, tile streams mode) of every variant of ours."""
        mode = self.opts.tile_streams
        auto_comm = dict(self.paths) if self.opts.emulate_tp else "auto"  # the stand-ins, or the block's choice
        out = [("compute", None, mode)] + [(n, c, mode) for n, c in self.paths.items()] + [("auto", auto_comm, mode)]
        for other in self.opts.compare_streams:  # the same fixed tile counts under other stream modes
            out += [(f"compute.{other}", None, other)] + [(f"{n}.{other}", c, other) for n, c in self.paths.items()
                                                        if not n.startswith("nccl_")]
        return out

    def time_variant(self, blk: TPAttention, name: str, comm, tiles, t1_out: dict) -> dict:
        y = blk.attend(self.q, self.k, self.v, Causal(), tiles=tiles).reshape(self.rows, self.hidden).clone()
        kind = "compute" if comm is None else "full"  # partial sums, or all-reduced outputs
        t1_out.setdefault(kind, y)
        ms = self.measure(lambda: blk.attend(self.q, self.k, self.v, Causal(), tiles=tiles))
        plan = blk.last_plan
        return {"ms": ms, "tiles": plan.num_tiles, "plan": list(plan.bounds), "comm": blk.last_comm,
                "streams": blk.last_streams, "err_vs_t1": _rel(y, t1_out[kind]), "err_vs_baseline": _rel(y, self.refs[kind])}

    def time_ours(self) -> None:
        runs, counts_fixed = self.result["runs"], list(self.opts.tile_counts)
        t1_out: dict = {}
        auto_plans = {}
        for name, comm, streams in self.variants():
            blk = self.block(NoComm(self.world, self.rank) if comm is None else comm, streams)
            counts = ["auto"] if name == "auto" else [1, *counts_fixed, "auto"]
            if "." in name:
                counts = counts_fixed + ([] if comm is None else ["auto"])
            for tiles in counts:
                if comm is None and tiles == "auto":
                    continue  # compute of auto's plans is timed below, per comm path
                label = f"{name}_t{tiles}"
                try:
                    runs[label] = self.time_variant(blk, name, comm, tiles, t1_out)
                    if tiles == "auto":
                        auto_plans[label] = (blk.last_plan, blk.last_streams)
                except Exception as e:  # one failing variant must not hide the others
                    runs[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
        for label, (plan, streams) in auto_plans.items():  # compute alone, the same plan and stream mode
            blk = self.block(NoComm(self.world, self.rank), streams)
            runs[label]["compute_ms"] = self.measure(lambda: blk.attend(self.q, self.k, self.v, Causal(), tiles=plan))
        # the baseline again at the end: the two readings bound the run-to-run spread of this shape
        self.result["baseline_compute_ms_again"] = self.measure(self._base_compute)
        self.result["tile_streams"] = self.opts.tile_streams


def bench_shape(hidden: int, heads: int, kv_heads: int, batch: int, seq: int, device, opts: BenchOptions) -> dict:
    world = opts.emulate_tp or dist.get_world_size()
    rank = 0 if opts.emulate_tp else dist.get_rank()
    run = ShapeRun(hidden, heads, kv_heads, batch, seq, world, rank, device, DTYPES[opts.dtype], opts)
    run.time_baselines()
    run.time_ours()
    return summarize(run.result)


def summarize(r: dict) -> dict:
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


def run_rank(rank: int, world: int, opts: BenchOptions) -> Optional[List[dict]]:
    device = job_device()
    if opts.emulate_tp and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    results = []
    for hidden, heads, batch, seq in opts.grid:
        r = bench_shape(hidden, heads, opts.kv_heads or heads, batch, seq, device, opts)
        results.append(r)
        if rank == 0 and opts.partial_path:  # what is done survives a run cut short
            with open(opts.partial_path, "w") as f:
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
    if args.out:
        out_dir(args.out)
    opts = BenchOptions(grid, args.tile_counts, args.dtype, args.repeats, args.warmup, args.kv_heads, args.emulate_tp,
                        args.attn_backend, args.few_ctas, args.compare_streams or [], args.tile_streams,
                        args.standin_latency_us, args.standin_gbps, args.standin_small_latency_us,
                        os.path.join(args.out, f"bench_partial_tp{args.emulate_tp or 'x'}.json") if args.out else None)
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
                   help="how our tiles share the GPU (parallel/layers.py; default auto: per shape)")
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
    g.add_argument("--standin-small-latency-us", type=positive_float, default=None,
                   help="override the stand-in's latency of messages below 256 KiB (default: parallel/link_models.py's "
                        "figure for the TP size)")
    g.add_argument("--standin-gbps", type=positive_float, default=None,
                   help="override the stand-in's bus bandwidth in GB/s (default: the fit for the TP size)")
    g = p.add_argument_group("timing and output")
    g.add_argument("--repeats", type=positive_int, default=20, help="timed runs per variant (default 20)")
    g.add_argument("--warmup", type=nonneg_int, default=3, help="untimed runs per variant first (default 3)")
    g.add_argument("--out", default=None, help="folder for bench_tp<N>[_emulated].md and .json")
    p.set_defaults(func=cmd_bench)
