"""What tiling could reach at best under the comm stand-in: zero tile tax, perfect overlap.

Reads the JSON files of `fastattn-dist bench --emulate-tp N --out DIR` and, for each shape, searches
tile bounds (t = 1..4 tiles, bounds on a 1/64 grid of the rows) for the shortest pipeline in which

  * tile i's compute costs its FLOP share of the measured t=1 compute (no tax at all): causal
    attention rows cost in proportion to their keys, o_proj rows all cost the same;
  * tile i's all-reduce starts when both its compute and tile i-1's all-reduce are done, and lasts
    what the stand-in models for its bytes: latency + 2 (N - 1) / N x bytes / bandwidth;
  * comm takes nothing from compute (as if it held no SMs).

The result is an upper bound on the speedup over the measured sequential baseline of the same run:
a plan that pays tile tax, or comm that slows attention, only does worse. Usage:

  python scripts/overlap_ceiling.py docs/emulation/bench_tp2_emulated.json docs/emulation/bench_tp4_emulated.json ...
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastattn_dist.parallel.link_models import GpuLinkModel  # noqa: E402

GRID = 64


def row_cost(a: float, b: float, attn_share: float) -> float:
    """FLOP share of rows [a, b) (fractions of S): causal attention ~ keys per row, o_proj ~ rows."""
    return attn_share * (b * b - a * a) + (1.0 - attn_share) * (b - a)


def pipeline_ms(bounds, compute_ms, attn_share, latency_ms, wire_ms):
    done = comm_end = 0.0
    for a, b in zip(bounds, bounds[1:]):
        done += compute_ms * row_cost(a, b, attn_share)
        comm_end = max(done, comm_end) + latency_ms + wire_ms * (b - a)
    return comm_end


def ceiling(row: dict) -> tuple[float, list]:
    tp, hidden, heads, seq, batch = row["tp"], row["hidden"], row["heads"], row["seq"], row["batch"]
    head_dim = hidden // heads
    local_heads = heads // tp
    attn_flops = 2.0 * seq * seq * head_dim * local_heads      # causal: half of 4 S^2 d per head
    proj_flops = 2.0 * seq * (local_heads * head_dim) * hidden
    attn_share = attn_flops / (attn_flops + proj_flops)
    compute_ms = min(row["runs"]["compute_t1"]["ms"], row["baseline_compute_ms"])
    model = GpuLinkModel.for_world_size(tp)
    bytes_ = batch * seq * hidden * 2
    latency_ms = model.latency_us / 1e3
    wire_ms = 2.0 * (tp - 1) / tp * bytes_ / (model.bus_gbps * 1e9) * 1e3
    best = (float("inf"), [0.0, 1.0])
    for t in range(1, 5):
        for inner in itertools.combinations(range(1, GRID), t - 1):
            bounds = [0.0] + [i / GRID for i in inner] + [1.0]
            ms = pipeline_ms(bounds, compute_ms, attn_share, latency_ms, wire_ms)
            if ms < best[0]:
                best = (ms, bounds)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="bench_tp*_emulated.json files")
    args = p.parse_args()
    print("| TP | hidden | B | S | baseline ms | ceiling ms | ceiling speedup | tiles (row fractions) | auto speedup | best measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.files:
        with open(path) as f:
            data = json.load(f)
        for row in data["results"]:
            ms, bounds = ceiling(row)
            base = row["baseline_ms"]
            fr = ", ".join(f"{b:.2f}" for b in bounds[1:-1]) or "-"
            print(f"| {row['tp']} | {row['hidden']} | {row['batch']} | {row['seq']} | {base:.3f} | {ms:.3f} | "
                  f"{base / ms:.2f}x | {len(bounds) - 1} ({fr}) | {row['auto_speedup']:.2f}x | "
                  f"{row['best_speedup']:.2f}x ({row['best_variant']}) |")


if __name__ == "__main__":
    main()
