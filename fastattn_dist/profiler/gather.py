"""Gather every rank's spans to one place, on rank 0's clock.

Clock offsets (``estimate_clock_offsets``): a two-collective handshake with rank 0, repeated.
Each round, rank r reads its clock (t0) and joins an all-reduce A; A cannot finish on rank 0
before rank r joined it, so rank 0 reads its clock (t1) after A is later than t0. Rank 0 then
sends t1 in an all-reduce B, which cannot finish on rank r before rank 0 joined it, so rank r's
read after B (t2) is later than t1. Hence the instant rank 0 read t1 lies within [t0, t2] on
rank r's clock, and the offset (rank 0 clock - rank r clock) lies in [t1 - t2, t1 - t0]. The
intervals of all rounds are intersected (clocks are monotonic and their drift over a few ms is
far below a microsecond); the estimate is the middle and the error bound the half width, at
most half the fastest round trip. This holds on gloo and NCCL (the host reads the result, so
it waits for the GPU) and across hosts; on one host ``perf_counter`` is CLOCK_MONOTONIC, shared
by all processes, and the estimate is ~0 within its bound.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

from ..recorder import Span
from .metrics import validate

ROUNDS = 16


@dataclass
class ClockOffset:
    rank: int
    offset_us: float  # add to this rank's times to get rank 0's clock
    error_us: float   # |true offset - offset_us| <= error_us
    host: str = ""

    def to_dict(self) -> dict:
        return {"rank": self.rank, "offset_us": self.offset_us, "error_us": self.error_us, "host": self.host}


@dataclass
class Profile:
    """All ranks' spans on rank 0's clock, with how they were aligned."""

    world_size: int
    spans: List[Span]
    clocks: List[ClockOffset]
    backend: str = ""
    meta: dict = field(default_factory=dict)

    def runs(self) -> List[str]:
        """Run labels in the order they were recorded."""
        first = {}
        for s in self.spans:
            first[s.run] = min(first.get(s.run, s.start_us), s.start_us)
        return sorted(first, key=first.get)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _now_us() -> float:
    return time.perf_counter() * 1e6  # the recorder's clock


def estimate_clock_offsets(rounds: int = ROUNDS) -> ClockOffset:
    """This rank's offset to rank 0's clock (every rank must call it; rank 0 gets offset 0 exactly)."""
    host = socket.gethostname()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ClockOffset(0, 0.0, 0.0, host)
    rank, dev = dist.get_rank(), _comm_device()
    lo, hi = -float("inf"), float("inf")
    best = None  # the fastest round's interval: the fallback if the intersection were empty
    for _ in range(rounds):
        a = torch.zeros(1, dtype=torch.float64, device=dev)
        t0 = _now_us()
        dist.all_reduce(a)
        a.item()  # wait for A to finish on this host
        t1 = _now_us() if rank == 0 else 0.0
        b = torch.tensor([t1], dtype=torch.float64, device=dev)
        dist.all_reduce(b)  # sum with zeros: every rank gets rank 0's t1
        t1 = b.item()
        t2 = _now_us()
        r_lo, r_hi = t1 - t2, t1 - t0
        lo, hi = max(lo, r_lo), min(hi, r_hi)
        if best is None or r_hi - r_lo < best[1] - best[0]:
            best = (r_lo, r_hi)
    if rank == 0:
        return ClockOffset(0, 0.0, 0.0, host)
    if lo > hi:  # cannot happen with monotonic clocks; stay safe with the tightest single round
        lo, hi = best
    return ClockOffset(rank, (lo + hi) / 2, (hi - lo) / 2, host)


def align(spans: List[Span], clock: ClockOffset) -> List[Span]:
    """Copies of ``spans`` moved onto rank 0's clock."""
    out = []
    for s in spans:
        d = s.to_dict()
        d["start_us"] += clock.offset_us
        d["end_us"] += clock.offset_us
        if d["issue_us"] is not None:
            d["issue_us"] += clock.offset_us
        d["rank"] = clock.rank
        out.append(Span.from_dict(d))
    return out


def gather_profile(spans: List[Span], clock: Optional[ClockOffset] = None, meta: Optional[dict] = None,
                   check: bool = True) -> Optional[Profile]:
    """Collective: every rank passes its spans; every rank gets the whole Profile (so all raise alike).

    Uses ``all_gather_object`` (works on gloo, and on NCCL once ``torch.cuda.set_device`` was
    called, as ``init_distributed`` does). ``check`` validates the runs (see metrics.validate).
    """
    if clock is None:
        clock = estimate_clock_offsets()
    payload = {"clock": clock.to_dict(), "spans": [s.to_dict() for s in spans]}
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        parts: list = [None] * world
        dist.all_gather_object(parts, payload)
        backend = dist.get_backend()
    else:
        world, parts = 1, [payload]
        backend = dist.get_backend() if dist.is_initialized() else "none"
    all_spans, clocks = [], []
    for part in parts:
        c = ClockOffset(**part["clock"])
        clocks.append(c)
        all_spans.extend(align([Span.from_dict(d) for d in part["spans"]], c))
    prof = Profile(world, all_spans, clocks, backend, dict(meta or {}))
    if check:
        validate(prof.spans, world)
    return prof
