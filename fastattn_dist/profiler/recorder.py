"""The recorder the block and the pipeline report to: spans of compute and comm, per tile.

Off by default (the block holds ``None`` and every report is behind one ``is not None`` check:
no events, no clocks, no syncs). On CPU spans are taken with ``time.perf_counter``; on CUDA with
events recorded on the streams and resolved only when ``spans()`` is called (one sync, after the
block), so the pipeline itself never waits for the host.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

COMPUTE, COMM, BLOCK = "compute", "comm", "block"


@dataclass
class Span:
    """One interval on one rank; times in microseconds on the rank's clock (perf_counter based)."""

    name: str          # "attention", "o_proj", "qkv", "allreduce", "block"
    lane: str          # COMPUTE, COMM or BLOCK
    tile: int          # tile index, -1 for whole-block work
    start_us: float
    end_us: float
    rank: int = 0
    run: str = ""      # which run this belongs to ("tiled", "sequential", ...)
    nbytes: int = 0
    issue_us: Optional[float] = None  # comm only: when it was handed to the comm engine
    args: dict = field(default_factory=dict)

    @property
    def dur_us(self) -> float:
        return self.end_us - self.start_us

    def to_dict(self) -> dict:
        return asdict(self)


class SpanRecorder:
    """Collects one rank's spans. ``run`` labels the spans of the calls that follow."""

    def __init__(self, rank: int = 0, device: Optional[torch.device] = None) -> None:
        self.rank = rank
        self.device = device if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.run = ""
        self._spans: List[Span] = []
        self._pending = []  # (name, lane, tile, start_event, end_event, run, nbytes)
        self._pending_comm = []
        self._base_event = None
        self._base_time = None

    # -- reports from the block -------------------------------------------
    def begin(self, name: str, tile: int = -1, lane: str = COMPUTE):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._ensure_base()
            return (name, lane, tile, ev)
        return (name, lane, tile, time.perf_counter())

    def end(self, token) -> None:
        name, lane, tile, start = token
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append((name, lane, tile, start, ev, self.run, 0))
            return
        self._spans.append(Span(name, lane, tile, start * 1e6, time.perf_counter() * 1e6, self.rank, self.run))

    def comm(self, handles) -> None:
        """The pipeline's comm handles, after they completed (wait_all returned)."""
        for h in handles:
            if self.cuda:
                if h.start_event is not None:
                    self._pending.append(("allreduce", COMM, h.tile, h.start_event, h.end_event, self.run, h.nbytes))
                continue
            if h.issue_time is None:  # world size 1: nothing was sent
                continue
            start = h.link_start if h.link_start is not None else h.issue_time
            end = h.end_time if h.end_time is not None else start
            self._spans.append(Span("allreduce", COMM, h.tile, start * 1e6, end * 1e6, self.rank, self.run,
                                    h.nbytes, issue_us=h.issue_time * 1e6))

    # -- results -----------------------------------------------------------
    def _ensure_base(self) -> None:
        # One event paired with a host time: CUDA spans are placed on the host clock through it.
        if self._base_event is None:
            torch.cuda.synchronize(self.device)
            self._base_event = torch.cuda.Event(enable_timing=True)
            self._base_event.record()
            torch.cuda.synchronize(self.device)
            self._base_time = time.perf_counter()

    def spans(self) -> List[Span]:
        if self._pending:
            torch.cuda.synchronize(self.device)
            base_us = self._base_time * 1e6
            for name, lane, tile, s, e, run, nbytes in self._pending:
                t0 = base_us + self._base_event.elapsed_time(s) * 1e3
                t1 = base_us + self._base_event.elapsed_time(e) * 1e3
                self._spans.append(Span(name, lane, tile, t0, t1, self.rank, run, nbytes))
            self._pending.clear()
        return sorted(self._spans, key=lambda s: (s.start_us, s.lane))

    def clear(self) -> None:
        self._spans.clear()
        self._pending.clear()
