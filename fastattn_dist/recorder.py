"""The recorder the block and the pipeline report to: spans of compute and comm, per tile.

Off by default (the block holds ``None`` and every report is behind one ``is not None`` check:
no events, no clocks, no syncs). On CPU spans are taken with ``time.perf_counter``; on CUDA with
events recorded on the streams and resolved only when ``spans()`` is called (one sync, after the
block), so the pipeline itself never waits for the host.

``TorchProfilerRecorder`` additionally opens a ``torch.profiler.record_function`` range per span,
so the spans show up beside the kernels in a torch.profiler trace; the plain recorder never
touches torch.profiler.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

import torch

COMPUTE, COMM, BLOCK = "compute", "comm", "block"
_OFF = contextlib.nullcontext()


def span(recorder: Optional["SpanRecorder"], name: str, tile: int = -1, lane: str = COMPUTE):
    """``with span(rec, "attention", i): ...`` records a span when ``rec`` is a recorder; with ``None``
    (profiling off) it is one shared no-op context: no events, no clocks, no allocation."""
    return _OFF if recorder is None else recorder.span(name, tile, lane)


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
    step: int = 0      # which recorded iteration (block call) of the run

    @property
    def dur_us(self) -> float:
        return self.end_us - self.start_us

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Span":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class SpanRecorder:
    """Collects one rank's spans. ``run`` and ``step`` label the spans of the calls that follow."""

    def __init__(self, rank: int = 0, device: Optional[torch.device] = None) -> None:
        self.rank = rank
        self.device = device if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.run = ""
        self.step = 0
        self._spans: List[Span] = []
        self._pending = []  # (name, lane, tile, start_event, end_event, run, nbytes, step)
        self._base_event = None
        self._base_time = None

    # -- reports from the block -------------------------------------------
    @contextlib.contextmanager
    def span(self, name: str, tile: int = -1, lane: str = COMPUTE):
        token = self.begin(name, tile, lane)
        try:
            yield
        finally:
            self.end(token)

    def begin(self, name: str, tile: int = -1, lane: str = COMPUTE):
        if self.cuda:
            self._ensure_base()  # before the first event: its sync must not fall inside a span
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return (name, lane, tile, ev)
        return (name, lane, tile, time.perf_counter())

    def end(self, token) -> None:
        name, lane, tile, start = token
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append((name, lane, tile, start, ev, self.run, 0, self.step))
            return
        self._spans.append(Span(name, lane, tile, start * 1e6, time.perf_counter() * 1e6, self.rank, self.run,
                                step=self.step))

    def comm(self, handles) -> None:
        """The pipeline's comm handles, after they completed (wait_all returned)."""
        prev_end = None
        for h in handles:
            if self.cuda:
                if h.start_event is not None:
                    self._pending.append(("allreduce", COMM, h.tile, h.start_event, h.end_event, self.run,
                                          h.nbytes, self.step))
                continue
            if h.issue_time is None:  # world size 1: nothing was sent
                continue
            start = h.link_start if h.link_start is not None else h.issue_time
            # Drawn as one queue, in issue order: a transfer starts once the previous one ended (gloo may run
            # two at once on its two threads; the union of the spans, so every metric, is the same either way).
            if prev_end is not None and start < prev_end:
                start = prev_end
            end = h.end_time if h.end_time is not None else start
            end = max(end, start)
            prev_end = end
            self._spans.append(Span("allreduce", COMM, h.tile, start * 1e6, end * 1e6, self.rank, self.run,
                                    h.nbytes, issue_us=h.issue_time * 1e6, step=self.step))

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
            for name, lane, tile, s, e, run, nbytes, step in self._pending:
                t0 = base_us + self._base_event.elapsed_time(s) * 1e3
                t1 = base_us + self._base_event.elapsed_time(e) * 1e3
                self._spans.append(Span(name, lane, tile, t0, t1, self.rank, run, nbytes, step=step))
            self._pending.clear()
        return sorted(self._spans, key=lambda s: (s.start_us, s.lane))

    def clear(self) -> None:
        self._spans.clear()
        self._pending.clear()


class TorchProfilerRecorder(SpanRecorder):
    """A SpanRecorder whose spans are also ``record_function`` ranges ("fastattn::attention[t3]").

    Run the block under ``torch.profiler.profile`` with this recorder attached and the ranges
    appear on the host thread of the exported trace, above the kernels they launched. The
    all-reduces are not ranges here (their end is known only after the fact); torch.profiler
    shows them as its own ``gloo:all_reduce`` / ``nccl:all_reduce`` events.
    """

    def begin(self, name: str, tile: int = -1, lane: str = COMPUTE):
        label = f"fastattn::{name}" if tile < 0 else f"fastattn::{name}[t{tile}]"
        rf = torch.autograd.profiler.record_function(label)
        rf.__enter__()
        return (super().begin(name, tile, lane), rf)

    def end(self, token) -> None:
        inner, rf = token
        super().end(inner)
        rf.__exit__(None, None, None)
