"""The comm paths of the tiled all-reduce, behind one interface.

Every path has ``world_size`` and ``rank`` (of the group it reduces over), and

  ``prepare(out)``            where compute must write the partial sums (``out`` itself, or a
                              symmetric buffer for the copy-engine path)
  ``start(piece, tile, rows)`` issue one tile's all-reduce after the compute that produced it
  ``wait(handle)``            order the caller after that tile's all-reduce (the next sublayer's tile)
  ``wait_all(handles)``       order the caller after all of them

Paths: ``ProcessGroupAllReduce`` (here: NCCL on GPUs, gloo on CPU, optionally paced by a simulated
``LinkModel``), ``CopyEngineAllReduce`` (ce_allreduce.py), ``StandInAllReduce`` (standin.py, a
modelled all-reduce for emulating one rank of a TP group on one GPU). ``make_comm`` builds one.

On CUDA a collective is issued from a dedicated high-priority comm stream that first waits for the
stream that computed the tile (an event, no host sync). On CPU (gloo) the transfer runs on gloo's
own thread while the caller computes the next tile: the simulated device's comm engine. With a
``LinkModel`` each handle also carries a modelled completion time: the link is busy for
``latency + bytes / bandwidth`` per transfer, transfers queue on it, and ``wait`` sleeps until the
later of the real and the modelled completion.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..config import LinkModel


class CommHandle:
    """One tile's in-flight all-reduce. Times are ``time.perf_counter()`` seconds (CPU path)."""

    __slots__ = ("tile", "nbytes", "work", "issue_time", "link_start", "modeled_end", "done_time",
                 "start_event", "end_event", "done")

    def __init__(self, tile: int, nbytes: int) -> None:
        self.tile = tile
        self.nbytes = nbytes
        self.work = None
        self.issue_time = self.link_start = self.modeled_end = self.done_time = None
        self.start_event = self.end_event = None  # CUDA timing events on the comm stream (GPU path, profiling)
        self.done = None  # CUDA event recorded after the tile's all-reduce: what ``wait`` orders on

    def _mark_done(self, _fut=None) -> None:
        # Runs on gloo's thread when the transfer finishes: the real completion time.
        self.done_time = time.perf_counter()

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        if self.modeled_end is not None:
            delay = self.modeled_end - time.perf_counter()
            if delay > 0:
                time.sleep(delay)

    @property
    def end_time(self) -> Optional[float]:
        """When the tile's data was complete on this rank (CPU path): real or modelled, the later."""
        if self.done_time is None and self.modeled_end is None:
            return None
        return max(t for t in (self.done_time, self.modeled_end) if t is not None)


@contextlib.contextmanager
def on_comm_stream(h: CommHandle, stream: "torch.cuda.Stream", device: torch.device, timing: bool):
    """The body runs on the comm stream, after the compute queued so far; timing events bracket it when asked
    (the profiler), and ``h.done`` marks its end (what the compute stream waits for)."""
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        if timing:
            h.start_event = torch.cuda.Event(enable_timing=True)
            h.start_event.record()
        yield
        if timing:
            h.end_event = torch.cuda.Event(enable_timing=True)
            h.end_event.record()
        h.done = torch.cuda.Event()
        h.done.record()


def comm_stream(device: torch.device) -> "torch.cuda.Stream":
    """A stream at the device's highest priority: a tile's all-reduce is scheduled as soon as its input is
    ready, ahead of the next tiles' compute (tile streams rank below it, row_parallel.TileStreams)."""
    return torch.cuda.Stream(device=device, priority=torch.cuda.Stream.priority_range()[1])


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def group_world_rank(group=None) -> tuple:
    """(world size, rank) of ``group``, or (1, 0) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


class ProcessGroupAllReduce:
    """Issues the tiles' all-reduces in order on one process group (and, on CUDA, one comm stream)."""

    def __init__(self, group=None, link: Optional[LinkModel] = None, device: Optional[torch.device] = None) -> None:
        self.group = group
        self.world_size, self.rank = group_world_rank(group)
        self.link = link if (link is not None and link.active) else None
        self.device = device if device is not None else torch.device("cpu")
        self._link_free_at = 0.0
        self._stream = None
        if self.device.type == "cuda" and self.world_size > 1:
            self._stream = comm_stream(self.device)
        self._timing = False

    @property
    def sm_fraction(self) -> float:
        """The share of SMs the collective holds while it runs (cost model): NCCL's channels on GPUs,
        assumed as the stand-in's default count; gloo runs on its own thread (0)."""
        if self._stream is None:
            return 0.0
        from .standin import GpuLinkModel
        return GpuLinkModel.for_world_size(max(2, self.world_size)).ctas / _sm_count(self.device)

    def enable_timing(self, on: bool = True) -> None:
        """Record per-tile comm spans (CUDA events on the comm stream, or gloo completion callbacks)."""
        self._timing = on

    def prepare(self, out: torch.Tensor) -> torch.Tensor:
        """Where compute writes the tiles' partial sums: ``out`` itself (the all-reduce is in place)."""
        return out

    def start(self, tensor: torch.Tensor, tile: int, rows=None) -> CommHandle:
        h = CommHandle(tile, tensor.numel() * tensor.element_size())
        if self.world_size == 1:
            return h
        if self._stream is not None:
            with on_comm_stream(h, self._stream, self.device, self._timing):
                work = dist.all_reduce(tensor, group=self.group, async_op=True)
                work.wait()  # the comm stream (not the host) waits for NCCL's stream
            tensor.record_stream(self._stream)
            return h
        now = time.perf_counter()
        h.issue_time = now
        h.work = dist.all_reduce(tensor, group=self.group, async_op=True)
        if self._timing:
            h.work.get_future().add_done_callback(h._mark_done)
        if self.link is not None:
            h.link_start = max(now, self._link_free_at)
            h.modeled_end = h.link_start + self.link.allreduce_seconds(h.nbytes, self.world_size)
            self._link_free_at = h.modeled_end
        return h

    def wait(self, handle: CommHandle) -> None:
        if handle.done is not None:
            torch.cuda.current_stream(self.device).wait_event(handle.done)
        elif self._stream is None:
            handle.wait()

    def wait_all(self, handles) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            return
        for h in handles:
            h.wait()


class NoComm:
    """Comm off: each rank keeps its own partial sums. Times the compute of a TP rank alone (bench, tune)."""

    sm_fraction = 0.0

    def __init__(self, world_size: int = 1, rank: int = 0) -> None:
        self.world_size, self.rank = world_size, rank

    def enable_timing(self, on: bool = True) -> None:
        pass

    def prepare(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def start(self, piece: torch.Tensor, tile: int, rows=None) -> CommHandle:
        return CommHandle(tile, piece.numel() * piece.element_size())

    def wait(self, handle: CommHandle) -> None:
        pass

    def wait_all(self, handles) -> None:
        pass


COMM_PATHS = ("nccl", "copy_engine")


def make_comm(path: str, group, device: torch.device, link: Optional[LinkModel] = None):
    """The comm object for ``path``: "nccl" is the process group's own all-reduce (gloo on CPU ranks),
    "copy_engine" the symmetric-memory path where it can run (one node of GPUs), else the process group's."""
    if path not in COMM_PATHS:
        raise ValueError(f"comm must be one of {COMM_PATHS} or a comm object, got {path!r}")
    if path == "copy_engine":
        from .ce_allreduce import CopyEngineAllReduce, copy_engine_available
        if copy_engine_available(device, group):
            return CopyEngineAllReduce(group, device)
    return ProcessGroupAllReduce(group, link, device)
