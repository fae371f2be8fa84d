"""A GPU kernel trace of an emulated model rank's prefill: where the compute ran and where the (modelled) comm ran.

One process plays rank 0 of a TP=N model (default: a 2-layer slice of Llama-3-70B at TP=8, S = 8192, random bf16
weights, the comm stand-in for every collective). Its prefill with tiles=1 and with the plan tiles="auto" picks
is captured as a CUDA graph and replayed under torch.profiler; every kernel becomes (stream, start, end, name).
From the kernels: compute = the union of the non-comm kernels, comm = the union of the stand-in's kernels, exposed
comm = comm not covered by compute, and per sublayer boundary whether its first tile waited for the previous
sublayer's last all-reduce (a "whole all-reduce" wait). Writes trace_<name>.json and a PNG timeline.

    python scripts/trace_model_overlap.py --model 70b --tp 8 --layers 2 --seq 8192 --out OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastattn_dist.models.bench_model import BenchModelOptions, PrefillVariant, build_model, random_ids  # noqa: E402
from fastattn_dist.parallel.emulated_comm import StandInAllReduce  # noqa: E402
from fastattn_dist.parallel.link_models import GpuLinkModel  # noqa: E402
from fastattn_dist.profiler.metrics import length, subtract, union  # noqa: E402

COMM = "hold"  # the stand-in's kernel


def kernels(prof) -> list:
    evs = [(getattr(e, "device_resource_id", 0), e.time_range.start, e.time_range.end, e.name)
           for e in prof.events() if e.device_type.name == "CUDA"]
    t0 = min(e[1] for e in evs)
    return sorted(((s, a - t0, b - t0, n) for s, a, b, n in evs), key=lambda e: e[1])


def summarize(ks: list, plan_tiles: int, sublayers: int) -> dict:
    comm = [(a, b) for _, a, b, n in ks if COMM in n]
    compute = union([(a, b) for _, a, b, n in ks if COMM not in n])
    end = max(b for _, _, b, _ in ks)
    exposed = subtract(union(comm), compute)
    # the stand-in's kernels in issue order: the embedding's all-reduce, then sublayer k's tile i at 1 + k T + i
    # (then the LM head's gather). A boundary waits for a whole all-reduce when the last tile's all-reduce of
    # sublayer k runs with no compute beside it: nothing of sublayer k + 1 could start before it ended.
    waits = 0
    for k in range(sublayers - 1):
        idx = 1 + (k + 1) * plan_tiles - 1
        if idx < len(comm):
            a, b = comm[idx]
            hidden = (b - a) - length(subtract([(a, b)], compute))
            waits += hidden < 0.5 * (b - a)
    return {"total_us": end, "compute_us": length(compute), "comm_us": length(union(comm)),
            "exposed_comm_us": length(exposed), "compute_idle_us": end - length(compute),
            "boundaries_waiting_for_a_whole_allreduce": int(waits), "boundaries": sublayers - 1, "kernels": len(ks)}


def plot(traces: dict, path: str, title: str) -> None:
    import matplotlib  # optional: the PNG only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(traces), 1, figsize=(16, 2.2 * len(traces)), squeeze=False)
    for ax, (name, t) in zip(axes[:, 0], traces.items()):
        streams = sorted({s for s, _, _, _ in t["kernels"]})
        for s, a, b, n in t["kernels"]:
            y = streams.index(s)
            colour = "#d62728" if COMM in n else ("#1f77b4" if "sdpa" in n or "attn" in n or "fmha" in n
                                                  else "#2ca02c")
            ax.broken_barh([(a / 1e3, (b - a) / 1e3)], (y - 0.4, 0.8), color=colour)
        ax.set_yticks(range(len(streams)), [f"stream {s}" for s in streams])
        s = t["summary"]
        ax.set_title(f"{name}: {s['total_us'] / 1e3:.2f} ms, exposed comm {s['exposed_comm_us'] / 1e3:.2f} ms, "
                     f"{s['boundaries_waiting_for_a_whole_allreduce']}/{s['boundaries']} sublayer boundaries wait for "
                     "a whole all-reduce", fontsize=9)
        ax.set_xlabel("ms")
    fig.suptitle(title + "\nred: comm stand-in (modelled NCCL), blue: attention, green: GEMMs and the rest", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="70b")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda")
    opts = BenchModelOptions(a.model, a.model, torch.bfloat16, seq=a.seq, layers=a.layers, emulate_tp=a.tp)
    comm = StandInAllReduce(a.tp, GpuLinkModel.for_world_size(a.tp), dev)
    model = build_model(opts, dev, comm, max_seq_len=a.seq + 1)
    ids = random_ids(model.config.vocab_size, 1, a.seq, 0, dev)
    traces = {}
    with torch.no_grad():
        for name, tiles in (("tiles=1", 1), ("auto", "auto")):
            plan = model.plan_for(1, a.seq, tiles)
            v = PrefillVariant(model, ids, plan, comm)
            for _ in range(3):
                v.replay()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                v.replay()
                torch.cuda.synchronize()
            ks = kernels(prof)
            traces[f"{name} ({plan.num_tiles} tiles)"] = {"plan": list(plan.bounds), "kernels": ks,
                                                         "summary": summarize(ks, plan.num_tiles, 2 * a.layers)}
            print(name, json.dumps(traces[f"{name} ({plan.num_tiles} tiles)"]["summary"]), flush=True)
    tag = f"{a.model}_tp{a.tp}_{a.layers}layers_s{a.seq}"
    with open(os.path.join(a.out, f"trace_{tag}.json"), "w") as f:
        json.dump({"model": a.model, "tp": a.tp, "layers": a.layers, "seq": a.seq, "device": torch.cuda.get_device_name(),
                   "comm": comm.model.describe(), "traces": traces}, f)
    plot(traces, os.path.join(a.out, f"trace_{tag}.png"),
         f"emulated rank 0 of {a.model} TP={a.tp}, {a.layers} layers, prefill of {a.seq} tokens, "
         f"{torch.cuda.get_device_name()} (comm modelled)")


if __name__ == "__main__":
    main()
