"""Overlap metrics from spans: interval arithmetic per rank and recorded iteration.

For one rank and one iteration (a ``block`` span and the spans inside it):

* block time: the block span's duration.
* compute: the length of the union of compute spans (qkv, attention, o_proj).
* comm: the length of the union of all-reduce spans.
* exposed comm: comm time not covered by compute on the same rank, |comm \\ compute|.
* hidden comm: comm - exposed, |comm & compute|.
* overlap fraction: hidden comm / comm (PyTorch Holistic Trace Analysis' comm/comp overlap);
  undefined (None) when there was no comm (one rank).
* bubble: time inside the block when neither compute nor comm is active (launch gaps, Python,
  waiting on nothing). By construction block = compute + exposed comm + bubble.

A run's summary is its median iteration (by block time, the slowest rank's): the block time is
that of the slowest rank, the other quantities are means over ranks (so overlap = sum of hidden
/ sum of comm over ranks). The per-tile table is the same iteration, mean over ranks.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..recorder import BLOCK, COMM, COMPUTE, Span

Interval = Tuple[float, float]


# -- interval arithmetic -----------------------------------------------------------------------
def union(intervals: Iterable[Interval]) -> List[Interval]:
    """Sorted, disjoint, merged intervals (empty ones dropped)."""
    out: List[List[float]] = []
    for a, b in sorted((a, b) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: Iterable[Interval]) -> float:
    return sum(b - a for a, b in union(intervals))


def intersect(a: Sequence[Interval], b: Sequence[Interval]) -> List[Interval]:
    """Intersection of two unions (each merged first)."""
    a, b = union(a), union(b)
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Sequence[Interval], b: Sequence[Interval]) -> List[Interval]:
    """The parts of union(a) not in union(b)."""
    out = []
    b = union(b)
    for lo, hi in union(a):
        cur = lo
        for blo, bhi in b:
            if bhi <= cur or blo >= hi:
                continue
            if blo > cur:
                out.append((cur, blo))
            cur = max(cur, bhi)
            if cur >= hi:
                break
        if cur < hi:
            out.append((cur, hi))
    return out


# -- validation ----------------------------------------------------------------------------------
def _by(spans: Iterable[Span], key) -> Dict:
    out = defaultdict(list)
    for s in spans:
        out[key(s)].append(s)
    return out


def _tile_count(spans: List[Span], lane: str) -> int:
    return len({s.tile for s in spans if s.lane == lane and s.tile >= 0})


def validate(spans: Sequence[Span], world_size: Optional[int] = None) -> None:
    """Raise ValueError unless every run has a block per rank and iteration and the ranks agree on tiles."""
    if not spans:
        raise ValueError("empty run: no spans were recorded (was a recorder attached to the block, and did "
                         "the block run while it was?)")
    for run, run_spans in _by(spans, lambda s: s.run).items():
        label = f"run {run!r}" if run else "the run"
        by_rank = _by(run_spans, lambda s: s.rank)
        if world_size is not None:
            missing = sorted(set(range(world_size)) - set(by_rank))
            if missing:
                raise ValueError(f"{label}: no spans from rank(s) {missing} of {world_size}")
        steps_of = {}
        for rank, rs in by_rank.items():
            blocks = [s for s in rs if s.lane == BLOCK]
            if not blocks:
                raise ValueError(f"{label}: rank {rank} recorded no 'block' span (empty run)")
            per_step = _by(blocks, lambda s: s.step)
            dup = [st for st, b in per_step.items() if len(b) > 1]
            if dup:
                raise ValueError(f"{label}: rank {rank} has several block spans for iteration {dup[0]}; "
                                 "set recorder.step before each block call")
            steps_of[rank] = sorted(per_step)
        ranks = sorted(by_rank)
        if any(steps_of[r] != steps_of[ranks[0]] for r in ranks):
            counts = ", ".join(f"rank {r}: {len(steps_of[r])}" for r in ranks)
            raise ValueError(f"{label}: ranks recorded different iterations ({counts})")
        for step in steps_of[ranks[0]]:
            for lane, what in ((COMPUTE, "tiles"), (COMM, "all-reduces")):
                counts = {r: _tile_count([s for s in by_rank[r] if s.step == step], lane) for r in ranks}
                if len(set(counts.values())) > 1:
                    detail = ", ".join(f"rank {r}: {n} {what}" for r, n in counts.items())
                    raise ValueError(f"mismatched tile counts between ranks in {label}, iteration {step} ({detail})")


# -- metrics -----------------------------------------------------------------------------------------
def rank_step_metrics(spans: Sequence[Span]) -> dict:
    """Metrics (microseconds) of one rank's one iteration: exactly one block span and what ran inside."""
    blocks = [s for s in spans if s.lane == BLOCK]
    if len(blocks) != 1:
        raise ValueError(f"expected one block span, got {len(blocks)}")
    win = [(blocks[0].start_us, blocks[0].end_us)]
    compute = intersect([(s.start_us, s.end_us) for s in spans if s.lane == COMPUTE], win)
    comm = intersect([(s.start_us, s.end_us) for s in spans if s.lane == COMM], win)
    block_us = blocks[0].dur_us
    compute_us, comm_us = length(compute), length(comm)
    exposed_us = length(subtract(comm, compute))
    busy_us = length(list(compute) + list(comm))
    tiles = []
    for tile in sorted({s.tile for s in spans if s.tile >= 0}):
        ts = [s for s in spans if s.tile == tile]
        cs = [s for s in ts if s.lane == COMM]
        tiles.append({
            "tile": tile,
            "attention_us": sum(s.dur_us for s in ts if s.name == "attention"),
            "o_proj_us": sum(s.dur_us for s in ts if s.name == "o_proj"),
            "comm_us": sum(s.dur_us for s in cs),
            "exposed_comm_us": length(subtract([(s.start_us, s.end_us) for s in cs], compute)),
            "queued_us": sum(s.start_us - s.issue_us for s in cs if s.issue_us is not None),
            "bytes": sum(s.nbytes for s in cs),
        })
    return {
        "block_us": block_us, "compute_us": compute_us, "comm_us": comm_us, "exposed_comm_us": exposed_us,
        "hidden_comm_us": comm_us - exposed_us,
        "overlap_fraction": (comm_us - exposed_us) / comm_us if comm_us > 0 else None,
        "bubble_us": max(0.0, block_us - busy_us), "tiles": tiles,
    }


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def run_metrics(spans: Sequence[Span]) -> dict:
    """One run's metrics (milliseconds): its median iteration, per rank, per tile."""
    by_step = _by(spans, lambda s: s.step)
    per_step = {}
    for step, ss in sorted(by_step.items()):
        per_step[step] = {r: rank_step_metrics(rs) for r, rs in sorted(_by(ss, lambda s: s.rank).items())}
    block_max = {step: max(m["block_us"] for m in ranks.values()) for step, ranks in per_step.items()}
    rep = min(per_step, key=lambda st: (block_max[st] != statistics.median_low(block_max.values()), st))
    ranks = per_step[rep]
    ms = 1e-3
    comm = _mean(m["comm_us"] for m in ranks.values())
    hidden = _mean(m["hidden_comm_us"] for m in ranks.values())
    ntiles = max(len(m["tiles"]) for m in ranks.values())
    per_tile = []
    for i in range(ntiles):
        rows = [m["tiles"][i] for m in ranks.values() if i < len(m["tiles"])]
        per_tile.append({"tile": rows[0]["tile"], **{k.replace("_us", "_ms"): _mean(r[k] for r in rows) * ms
                                                     for k in rows[0] if k.endswith("_us")},
                         "bytes": rows[0]["bytes"]})
    return {
        "tiles": ntiles,
        "iterations": len(per_step),
        "step": rep,
        "block_ms": block_max[rep] * ms,
        "block_ms_per_iteration": [block_max[st] * ms for st in sorted(per_step)],
        "compute_ms": _mean(m["compute_us"] for m in ranks.values()) * ms,
        "comm_ms": comm * ms,
        "exposed_comm_ms": _mean(m["exposed_comm_us"] for m in ranks.values()) * ms,
        "hidden_comm_ms": hidden * ms,
        "overlap_fraction": hidden / comm if comm > 0 else None,
        "bubble_ms": _mean(m["bubble_us"] for m in ranks.values()) * ms,
        "per_rank": [{"rank": r, **{k.replace("_us", "_ms"): (v * ms if k.endswith("_us") else v)
                                    for k, v in m.items() if k != "tiles"}} for r, m in ranks.items()],
        "per_tile": per_tile,
    }


def compute_metrics(spans: Sequence[Span], world_size: Optional[int] = None,
                    baseline: str = "sequential", target: str = "tiled") -> dict:
    """Validated metrics of every run; ``speedup`` = baseline block time / target block time when both ran."""
    validate(spans, world_size)
    runs = {}
    for run, rs in _by(spans, lambda s: s.run).items():
        runs[run] = run_metrics(rs)
    out = {"runs": runs}
    if baseline in runs and target in runs and runs[target]["block_ms"] > 0:
        out["speedup"] = runs[baseline]["block_ms"] / runs[target]["block_ms"]
    return out


# -- tables ----------------------------------------------------------------------------------------
def format_table(rows: List[Tuple[str, ...]]) -> str:
    """Rows of strings as aligned columns (the first left-aligned), a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_runs(metrics: dict) -> str:
    rows = [("run", "tiles", "block ms", "compute ms", "comm ms", "exposed comm ms", "overlap", "bubble ms")]
    for run, m in metrics["runs"].items():
        rows.append((run, str(m["tiles"]), f"{m['block_ms']:.3f}", f"{m['compute_ms']:.3f}", f"{m['comm_ms']:.3f}",
                     f"{m['exposed_comm_ms']:.3f}", _pct(m["overlap_fraction"]), f"{m['bubble_ms']:.3f}"))
    return format_table(rows)


def format_tiles(run: dict) -> str:
    rows = [("tile", "attention ms", "o_proj ms", "comm ms", "exposed ms", "queued ms", "KiB")]
    for t in run["per_tile"]:
        rows.append((str(t["tile"]), f"{t['attention_ms']:.3f}", f"{t['o_proj_ms']:.3f}", f"{t['comm_ms']:.3f}",
                     f"{t['exposed_comm_ms']:.3f}", f"{t['queued_ms']:.3f}", f"{t['bytes'] / 1024:.0f}"))
    return format_table(rows)
