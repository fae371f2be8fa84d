"""Kernel timelines of a few tile variants on one GPU (torch.profiler over CUDA-graph replays).

Companion of explore_tile_overlap.py: for one per-rank shape, capture each variant, replay it
under torch.profiler and write, per variant, every kernel as (stream, start us, duration us, name),
plus the stand-in's own per-CTA timestamps (when each CTA became resident, finished copying, left).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from explore_tile_overlap import Runner, Shape, plan_bounds, timed_graph  # noqa: E402
from fastattn_dist.parallel.emulated_comm import StandInAllReduce
from fastattn_dist.parallel.link_models import GpuLinkModel  # noqa: E402


def kernel_timeline(prof):
    evs = []
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        evs.append((getattr(e, "device_resource_id", 0), e.time_range.start, e.time_range.end - e.time_range.start,
                    e.name[:60]))
    if not evs:
        return []
    t0 = min(s for _, s, _, _ in evs)
    return sorted([(st, round(s - t0, 1), round(d, 1), n) for st, s, d, n in evs], key=lambda x: x[1])


def main():
    from torch.profiler import ProfilerActivity, profile

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="trace_out")
    p.add_argument("--shape", default="4,8192,64,8192,1")
    p.add_argument("--tiles", type=int, default=2)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tp, hidden, heads, seq, batch = (int(x) for x in args.shape.split(","))
    sh = Shape(tp, hidden, heads, seq, batch)
    streams = [torch.cuda.Stream() for _ in range(2)]
    helper = torch.cuda.Stream()
    bounds = plan_bounds(sh, args.tiles)
    report = {"shape": sh.name, "bounds": list(bounds), "variants": {}}
    variants = []
    for path in ("nccl", "copy_engine"):
        for k in (1, 2):
            for prio in (-1, 0):
                for ctas in ((16, 4) if path == "nccl" else (16,)):
                    variants.append((path, k, prio, ctas))
    for path, k, prio, ctas in variants:
        model = GpuLinkModel.for_world_size(tp, path=path, ctas=ctas)
        comm = StandInAllReduce(tp, model, comm_stream_priority=prio)
        comm.trace = torch.zeros(ctas * 3 * 1, dtype=torch.int64, device="cuda")
        r = Runner(sh, streams[:k], helper, comm)
        name = f"{path}_s{k}_prio{prio}_ctas{ctas}"
        ms, g = timed_graph(lambda: r.run("split", bounds), 20)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        tr = comm.trace.view(-1, 3).tolist()
        t_first = min(a for a, _, _ in tr) if tr else 0
        report["variants"][name] = {"ms": ms, "kernels": kernel_timeline(prof),
                                    "standin_last_cta_us": [[round((a - t_first) / 1e3, 1), round((b - t_first) / 1e3, 1),
                                                             round((c - t_first) / 1e3, 1)] for a, b, c in tr]}
        print(f"{name}: {ms:.3f} ms", flush=True)
    # compute-only references
    for k in (1, 2):
        r = Runner(sh, streams[:k], helper, None)
        ms, g = timed_graph(lambda: r.run("split", bounds), 20)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        report["variants"][f"compute_s{k}"] = {"ms": ms, "kernels": kernel_timeline(prof)}
        print(f"compute_s{k}: {ms:.3f} ms", flush=True)
    acc = []
    for tpx in (2, 4):
        comm = StandInAllReduce(tpx)
        for mb in (8, 32, 128):
            x = torch.randn(mb * (1 << 20) // 2, device="cuda").to(torch.bfloat16)
            ms, _ = timed_graph(lambda: comm.issue(x), 20)
            acc.append((tpx, mb, comm.model.allreduce_seconds(x.numel() * 2, tpx) * 1e3, ms))
            print(f"standin tp{tpx} {mb}MB want {acc[-1][2]:.3f} got {ms:.3f}", flush=True)
    report["standin_accuracy"] = acc
    with open(os.path.join(args.out, "trace.json"), "w") as f:
        json.dump(report, f)
    for name, v in report["variants"].items():
        print(f"== {name} {v['ms']:.3f} ms, {len(v['kernels'])} kernels")


if __name__ == "__main__":
    main()
