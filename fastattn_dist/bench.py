"""``fastattn-dist bench``: the tiled block against what a user would write, in one run.

Per shape, from the same projected q, k, v on every rank:
  baseline     SDPA (PyTorch's best backend) -> o_proj GEMM -> one all_reduce, in sequence
  parts        attention alone, o_proj alone, the all-reduce alone: the ideal bound
               max(attention + o_proj, all-reduce) of a perfect overlap
  ours         TPAttention.attend with tiles=1, "auto" and fixed counts, eager and CUDA graph
Times are CUDA-event (or host clock on CPU) medians over repeats, max over ranks. Outputs are
checked against the baseline's. Run under torchrun on GPUs (NCCL); on CPU it spawns gloo ranks,
which checks the code path, not GPU speed.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from typing import Callable, List

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .block import TPAttention
from .parallel.ce_allreduce import copy_engine_available

GRID = [(4096, 32, 2048), (4096, 32, 8192), (4096, 32, 32768), (8192, 64, 2048), (8192, 64, 8192),
        (8192, 64, 32768)]
QUICK_GRID = [(256, 8, 192), (256, 8, 301)]


def _timer(device: torch.device, repeats: int, warmup: int):
    def measure(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            _barrier(device)
            if device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return _max_over_ranks(statistics.median(times), device)
    return measure


def _barrier(device):
    if dist.get_world_size() > 1:
        t = torch.zeros(1, device=device)
        dist.all_reduce(t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _max_over_ranks(v: float, device) -> float:
    t = torch.tensor([v], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _sdpa_best(q, k, v):
    """[B, S, H, D] in and out; PyTorch's default SDPA dispatch (cuDNN or FA2 on Hopper), causal."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def bench_shape(hidden: int, heads: int, kv_heads: int, seq: int, tile_counts: List[int], device, dtype,
                repeats: int, warmup: int, graphs: bool, group=None, attn_backend: str = "auto") -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    D = hidden // heads
    Hl, Hkvl = heads // world, kv_heads // world
    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    q = torch.randn(1, seq, Hl, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(1, seq, Hkvl, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(1, seq, Hkvl, D, generator=g).to(device=device, dtype=dtype)
    wo = (torch.randn(hidden, Hl * D, generator=g) * (hidden ** -0.5)).to(device=device, dtype=dtype)
    measure = _timer(device, repeats, warmup)

    def baseline():  # what a user writes: default process group, one all_reduce at the end
        a = _sdpa_best(q, k, v).reshape(seq, Hl * D)
        y = a @ wo.t()
        dist.all_reduce(y)
        return y

    attn_out = _sdpa_best(q, k, v).reshape(seq, Hl * D)
    y_full = attn_out @ wo.t()
    r = {"hidden": hidden, "heads": heads, "kv_heads": kv_heads, "seq": seq, "world": world}
    r["baseline_ms"] = measure(baseline)
    r["attn_ms"] = measure(lambda: _sdpa_best(q, k, v))
    r["oproj_ms"] = measure(lambda: attn_out @ wo.t())
    r["allreduce_ms"] = measure(lambda: dist.all_reduce(y_full))
    r["ideal_ms"] = max(r["attn_ms"] + r["oproj_ms"], r["allreduce_ms"])
    ref = baseline().double()

    blocks = {}
    comms = ["nccl"] + (["copy_engine"] if copy_engine_available(device) else [])
    for comm in comms:
        for use_graph in ([False, True] if graphs else [False]):
            blk = TPAttention(hidden, heads, kv_heads, tiles="auto", dtype=dtype, device=device, group=group,
                              cuda_graph=use_graph, comm=comm, backend=attn_backend)
            with torch.no_grad():
                blk.o_proj.weight.copy_(wo)
            blocks[(comm, use_graph)] = blk
    runs = {}
    for (comm, use_graph), blk in blocks.items():
        for tiles in [1, "auto", *tile_counts]:
            name = f"{'ce_' if comm == 'copy_engine' else ''}{'graph' if use_graph else 'eager'}_t{tiles}"
            try:
                y = blk.attend(q, k, v, "causal", tiles=tiles).double()
                err = ((y - ref).norm() / ref.norm()).item()
                ms = measure(lambda: blk.attend(q, k, v, "causal", tiles=tiles))
                runs[name] = {"ms": ms, "tiles": blk.last_plan.num_tiles, "rel_err": err,
                              "plan": list(blk.last_plan.bounds)}
            except Exception as e:  # one failing variant (e.g. graph capture) must not hide the others
                runs[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    r["runs"] = runs
    ok = {n: v for n, v in runs.items() if "ms" in v}
    best = min(ok, key=lambda n: ok[n]["ms"])
    auto = min((n for n in ok if n.endswith("_tauto") and not n.startswith("ce_")), key=lambda n: ok[n]["ms"])
    for tag, n in (("best", best), ("auto", auto)):
        r[f"{tag}_variant"], r[f"{tag}_ms"] = n, ok[n]["ms"]
        r[f"{tag}_speedup"] = r["baseline_ms"] / ok[n]["ms"]
        head = r["baseline_ms"] - r["ideal_ms"]
        r[f"{tag}_headroom_captured"] = (r["baseline_ms"] - ok[n]["ms"]) / head if head > 0 else float("nan")
    r["max_rel_err"] = max(v["rel_err"] for v in ok.values())
    return r


def comm_group(max_ctas: int, high_priority: bool):
    """A process group over all ranks whose NCCL kernels may use at most ``max_ctas`` SMs, so the
    attention kernels of the next tile keep the rest. None (the default group) when not on NCCL."""
    if dist.get_backend() != "nccl" or not max_ctas:
        return None
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = high_priority
    opts.config.max_ctas = max_ctas
    opts.config.min_ctas = min(max_ctas, 1)
    return dist.new_group(list(range(dist.get_world_size())), pg_options=opts)


def run_rank(rank: int, world: int, opts: dict) -> List[dict]:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    group = comm_group(opts.get("comm_max_ctas") or 0, opts.get("comm_high_priority", False))
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[opts["dtype"]]
    results = []
    for hidden, heads, seq in opts["grid"]:
        kv = opts.get("kv_heads") or heads
        r = bench_shape(hidden, heads, kv, seq, opts["tile_counts"], device, dtype, opts["repeats"], opts["warmup"],
                        opts["graphs"], group=group, attn_backend=opts.get("attn_backend", "auto"))
        r["comm_max_ctas"] = opts.get("comm_max_ctas") or "default"
        results.append(r)
        if rank == 0:
            print(f"[bench] hidden {hidden} S {seq}: baseline {r['baseline_ms']:.3f} ms, best {r['best_variant']} "
                  f"{r['best_ms']:.3f} ms ({r['best_speedup']:.2f}x), auto {r['auto_ms']:.3f} ms "
                  f"({r['auto_speedup']:.2f}x), ideal {r['ideal_ms']:.3f} ms", file=sys.stderr, flush=True)
    return results


def markdown(results: List[dict], meta: dict) -> str:
    lines = [f"Command: `{meta['command']}`  ", f"Device: {meta['device']}, TP={meta['world']}, {meta['dtype']}, "
             f"causal, batch 1; torch {meta['torch']}; date {meta['date']}; our comm: {meta['comm']}; "
             f"our attention backend: {meta.get('attn_backend', 'auto')}  ",
             f"Times: median of repeats, {meta['timer']}, max over ranks (ms). Baseline: SDPA (default backend) + "
             "o_proj GEMM + one all_reduce, in sequence, measured in the same run.", "",
             "| hidden/heads | S | attn | o_proj | all-reduce | baseline | ideal | ours t=1 | ours auto (tiles) | "
             "best (variant) | auto speedup | best speedup | headroom captured (best) | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t1 = r["runs"].get("eager_t1", {}).get("ms", float("nan"))
        auto_tiles = r["runs"][r["auto_variant"]]["tiles"]
        lines.append(f"| {r['hidden']}/{r['heads']} | {r['seq']} | {r['attn_ms']:.3f} | {r['oproj_ms']:.3f} | "
                     f"{r['allreduce_ms']:.3f} | {r['baseline_ms']:.3f} | {r['ideal_ms']:.3f} | {t1:.3f} | "
                     f"{r['auto_ms']:.3f} ({auto_tiles}) | {r['best_ms']:.3f} ({r['best_variant']}) | "
                     f"{r['auto_speedup']:.2f}x | {r['best_speedup']:.2f}x | {r['best_headroom_captured']:.0%} | "
                     f"{r['max_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


@dataclass
class BenchShape:
    """What run_job checks before starting ranks (the first shape of the grid)."""

    world_size: int
    hidden: int
    heads: int
    kv_heads: int


def cmd_bench(args) -> int:
    from .cli import run_job

    grid = QUICK_GRID if args.quick else GRID
    if args.seq:
        grid = [(h, n, s) for (h, n, _) in grid for s in args.seq]
        grid = list(dict.fromkeys(grid))
    if args.hidden:
        grid = [g for g in grid if g[0] in args.hidden]
    opts = {"grid": grid, "tile_counts": args.tile_counts, "dtype": args.dtype, "repeats": args.repeats,
            "warmup": args.warmup, "graphs": not args.no_graphs, "kv_heads": args.kv_heads,
            "comm_max_ctas": args.comm_max_ctas, "comm_high_priority": args.comm_high_priority,
            "attn_backend": args.attn_backend}

    cfg = BenchShape(args.world_size, grid[0][0], grid[0][1], args.kv_heads or grid[0][1])
    results = run_job(_job, args, cfg, (opts,))
    if results is None:
        return 0
    meta = {"command": "fastattn-dist " + " ".join(sys.argv[1:]), "world": results[0]["world"],
            "dtype": args.dtype, "torch": torch.__version__, "date": date.today().isoformat(),
            "timer": "CUDA events" if torch.cuda.is_available() else "host clock",
            "comm": (f"NCCL group with max_ctas={args.comm_max_ctas}" + (", high-priority stream"
                     if args.comm_high_priority else "")) if args.comm_max_ctas else "default process group",
            "attn_backend": args.attn_backend,
            "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU")}
    md = markdown(results, meta)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_block.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "bench_block.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


def _job(rank, world, cfg, opts):
    return run_rank(rank, world, opts)


def register(sub) -> None:
    from .cli import _positive_int

    p = sub.add_parser("bench", help="time the tiled block against SDPA + GEMM + all_reduce (GPUs via torchrun)")
    p.add_argument("--world-size", "-n", type=_positive_int, default=2)
    p.add_argument("--launcher", choices=("auto", "spawn", "env"), default="auto")
    p.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run of the code path)")
    p.add_argument("--seq", type=_positive_int, nargs="*", help="override the sequence lengths")
    p.add_argument("--hidden", type=_positive_int, nargs="*", help="only these hidden sizes of the grid")
    p.add_argument("--kv-heads", type=_positive_int, default=None, help="kv heads (default: as many as heads)")
    p.add_argument("--tile-counts", type=_positive_int, nargs="*", default=[2, 3, 4, 6, 8])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--repeats", type=_positive_int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph variants")
    p.add_argument("--comm-max-ctas", type=int, default=0,
                   help="NCCL: our block's all-reduces use a group limited to this many CTAs (0: default group)")
    p.add_argument("--comm-high-priority", action="store_true", help="NCCL: high-priority stream for that group")
    p.add_argument("--attn-backend", default="auto", choices=("auto", "triton", "cudnn", "torch"),
                   help="attention backend of our block (the baseline always uses SDPA's default)")
    p.add_argument("--out", default=None, help="folder for bench_block.md and bench_block.json")
    p.set_defaults(func=cmd_bench)
