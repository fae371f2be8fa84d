"""Chrome Trace Event Format export, and writing the output files all-or-nothing.

The trace opens in Perfetto (ui.perfetto.dev) and chrome://tracing. One process per rank and
run ("tiled / rank 1"), threads "block", "compute", "comm (all-reduce)" and "exposed comm"; one
complete event ('X') per span with the tile and bytes in ``args``; a flow arrow ('s' -> 'f')
from each tile's o_proj to its all-reduce. Each run's time starts at 0 (its first span on rank
0's clock) so that runs stacked in the viewer line up for comparison.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, List, Optional, Sequence

from ..files import check_writable_dir
from .gather import Profile
from .metrics import subtract
from ..recorder import BLOCK, COMM, COMPUTE, Span

# pid/tid 0 mean "idle/kernel" to some viewers: ours start at 1.
TRACKS = ((BLOCK, 1, "block"), (COMPUTE, 2, "compute"), (COMM, 3, "comm (all-reduce)"), ("exposed", 4, "exposed comm"))
TID = {lane: tid for lane, tid, _ in TRACKS}


def _label(s: Span) -> str:
    return s.name if s.tile < 0 else f"{s.name} t{s.tile}"


def chrome_trace(profile: Profile, runs: Optional[Sequence[str]] = None, other: Optional[dict] = None) -> dict:
    """The trace as a JSON-ready dict (``{"traceEvents": [...], ...}``) for the given runs (default all)."""
    runs = list(runs) if runs is not None else profile.runs()
    events: List[dict] = []
    flow_id = 0
    for ri, run in enumerate(runs):
        spans = [s for s in profile.spans if s.run == run]
        if not spans:
            raise ValueError(f"no spans for run {run!r} (runs recorded: {profile.runs()})")
        origin = min(s.start_us for s in spans)
        for rank in range(profile.world_size):
            pid = 1 + ri * profile.world_size + rank
            pname = f"rank {rank}" if len(runs) == 1 else f"{run} / rank {rank}"
            events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 1, "args": {"name": pname}})
            events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 1, "args": {"sort_index": pid}})
            for _, tid, tname in TRACKS:
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": tname}})
                events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                               "args": {"sort_index": tid}})
            mine = [s for s in spans if s.rank == rank]
            for s in mine:
                args = {"tile": s.tile, "iteration": s.step, "run": run, "rank": rank}
                if s.lane == COMM:
                    args["bytes"] = s.nbytes
                    if s.issue_us is not None:
                        args["issued_at_us"] = round(s.issue_us - origin, 3)
                        args["queued_us"] = round(s.start_us - s.issue_us, 3)
                events.append({"ph": "X", "name": _label(s), "cat": s.lane, "ts": s.start_us - origin,
                               "dur": s.dur_us, "pid": pid, "tid": TID[s.lane], "args": args})
            for step in sorted({s.step for s in mine}):
                ss = [s for s in mine if s.step == step]
                compute = [(s.start_us, s.end_us) for s in ss if s.lane == COMPUTE]
                comms = [s for s in ss if s.lane == COMM]
                for c in comms:
                    for a, b in subtract([(c.start_us, c.end_us)], compute):
                        events.append({"ph": "X", "name": f"exposed t{c.tile}", "cat": "exposed", "ts": a - origin,
                                       "dur": b - a, "pid": pid, "tid": TID["exposed"],
                                       "args": {"tile": c.tile, "iteration": step, "bytes": c.nbytes}})
                oproj = {s.tile: s for s in ss if s.name == "o_proj"}
                for c in comms:
                    src = oproj.get(c.tile)
                    if src is None:
                        continue
                    flow_id += 1
                    name = f"tile {c.tile} -> all-reduce"
                    events.append({"ph": "s", "id": flow_id, "name": name, "cat": "flow", "pid": pid,
                                   "tid": TID[COMPUTE], "ts": (src.start_us + src.end_us) / 2 - origin})
                    events.append({"ph": "f", "bp": "e", "id": flow_id, "name": name, "cat": "flow", "pid": pid,
                                   "tid": TID[COMM], "ts": (c.start_us + c.end_us) / 2 - origin})
    other = dict(other or {})
    other.setdefault("clock_offsets", [c.to_dict() for c in profile.clocks])
    other.setdefault("runs", runs)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


# -- files -------------------------------------------------------------------------------------------
def check_writable(out_dir: str) -> str:
    """Create ``out_dir`` if needed and prove a file can be written there; a clear ValueError if not."""
    return check_writable_dir(out_dir, "--out")


def write_outputs(out_dir: str, files: Dict[str, bytes]) -> List[str]:
    """Write every file to a temporary name first, then rename them all: no half-written outputs.

    A full disk or a folder that went away is a ValueError with one line (the CLI's exit code 2)."""
    path = check_writable(out_dir)
    temps = {}
    try:
        for name, data in files.items():
            tmp = os.path.join(path, f".{name}.{os.getpid()}.tmp")
            temps[name] = tmp
            with open(tmp, "wb") as f:  # a plain open: the user's umask, unlike mkstemp's 0600
                f.write(data)
        for name, tmp in temps.items():
            os.replace(tmp, os.path.join(path, name))
    except BaseException as e:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise ValueError(f"could not write the profile to {path}: {e.strerror or e}") from None
        raise
    return [os.path.join(path, n) for n in files]


def dumps(obj, indent: Optional[int] = None) -> bytes:
    seps = (",", ":") if indent is None else (",", ": ")
    return (json.dumps(obj, indent=indent, separators=seps, allow_nan=False) + "\n").encode()
