"""Overlap profiler: record per-tile compute and comm spans, gather them, export trace / PNG / metrics.

  recorder.py  SpanRecorder (what the block reports to), TorchProfilerRecorder (record_function ranges)
  gather.py    clock offsets to rank 0 and gathering of all ranks' spans (Profile)
  metrics.py   interval arithmetic: exposed comm, overlap fraction, bubble, per-tile table
  export.py    Chrome Trace Event Format JSON; all-or-nothing file writing
  plot.py      the PNG timeline
  job.py       what each rank runs for ``fastattn-dist profile``
  report.py    the files and the printed report of ``fastattn-dist profile``
"""
from .gather import ClockOffset, Profile, estimate_clock_offsets, gather_profile
from .metrics import compute_metrics, validate
from .recorder import BLOCK, COMM, COMPUTE, Span, SpanRecorder, TorchProfilerRecorder

__all__ = ["Span", "SpanRecorder", "TorchProfilerRecorder", "COMPUTE", "COMM", "BLOCK", "ClockOffset", "Profile",
           "estimate_clock_offsets", "gather_profile", "compute_metrics", "validate"]
