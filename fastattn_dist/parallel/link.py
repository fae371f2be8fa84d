"""Asynchronous all-reduce of one tile, with an optional simulated link.

``AllReduceStream.start(tensor)`` issues ``dist.all_reduce(async_op=True)`` and returns a
``CommHandle``; ``handle.wait()`` returns once the data has arrived. On CUDA the collective is
issued from a dedicated comm stream that first waits for the compute stream (an event, no host
sync), and ``wait`` makes the compute stream wait for it. On CPU (gloo) the transfer runs on
gloo's own thread while the caller computes the next tile: the simulated device's comm engine.

With a ``LinkModel`` each handle also carries a modelled completion time: the link is busy
for ``latency + bytes / bandwidth`` per transfer, transfers queue on it, and ``wait`` sleeps
until the later of the real and the modelled completion.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from ..config import LinkModel


class CommHandle:
    """One tile's in-flight all-reduce. Times are ``time.perf_counter()`` seconds (CPU path)."""

    __slots__ = ("tile", "nbytes", "work", "issue_time", "link_start", "modeled_end", "done_time",
                 "start_event", "end_event")

    def __init__(self, tile: int, nbytes: int) -> None:
        self.tile = tile
        self.nbytes = nbytes
        self.work = None
        self.issue_time = self.link_start = self.modeled_end = self.done_time = None
        self.start_event = self.end_event = None  # CUDA events on the comm stream (GPU path)

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


class AllReduceStream:
    """Issues the tiles' all-reduces in order on one process group (and, on CUDA, one comm stream)."""

    def __init__(self, group=None, link: Optional[LinkModel] = None, device: Optional[torch.device] = None,
                 comm_stream_priority: int = -1) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        self.link = link if (link is not None and link.active) else None
        self.device = device if device is not None else torch.device("cpu")
        self._link_free_at = 0.0
        self._stream = None
        if self.device.type == "cuda" and self.world_size > 1:
            # Higher priority (lower number) so the small comm kernels are scheduled as soon as their
            # input is ready, instead of queuing behind the next tile's attention blocks.
            self._stream = torch.cuda.Stream(device=self.device, priority=comm_stream_priority)
        self._timing = False

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
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                if self._timing:
                    h.start_event = torch.cuda.Event(enable_timing=True)
                    h.start_event.record()
                work = dist.all_reduce(tensor, group=self.group, async_op=True)
                work.wait()  # the comm stream (not the host) waits for NCCL's stream
                if self._timing:
                    h.end_event = torch.cuda.Event(enable_timing=True)
                    h.end_event.record()
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

    def wait_all(self, handles) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            return
        for h in handles:
            h.wait()
