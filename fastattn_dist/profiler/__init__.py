"""Overlap profiler: record per-tile compute and comm spans, gather them, export trace / PNG / metrics.

  (../recorder.py at the bottom of the package: SpanRecorder, what the block and the pipeline report to)
  gather.py    clock offsets to rank 0 and gathering of all ranks' spans (Profile)
  metrics.py   interval arithmetic: exposed comm, overlap fraction, bubble, per-tile table
  export.py    Chrome Trace Event Format JSON; all-or-nothing file writing
  plot.py      the PNG timeline
  report.py    the files of a profile: trace.json, timeline.png, metrics.json
"""
from .gather import ClockOffset, Profile, estimate_clock_offsets, gather_profile
from .metrics import compute_metrics, validate
from ..recorder import BLOCK, COMM, COMPUTE, Span, SpanRecorder, TorchProfilerRecorder

__all__ = ["Span", "SpanRecorder", "TorchProfilerRecorder", "COMPUTE", "COMM", "BLOCK", "ClockOffset", "Profile",
           "estimate_clock_offsets", "gather_profile", "compute_metrics", "validate"]
