"""The comm paths of the tiled all-reduce and of every other collective of the block and the model, behind one
interface (``CommPath``).

Per tile (the tiling-AllReduce pipeline):

  ``prepare(out, slot)``       where compute must write a sublayer's partial sums (``out`` itself, or a symmetric
                               buffer for the copy-engine path; ``slot`` tells consecutive sublayers' buffers apart)
  ``start(piece, tile, rows)`` issue one tile's all-reduce after the compute that produced it
  ``wait(handle)``             order the caller after that tile's all-reduce (the next sublayer's tile)
  ``wait_all(handles)``        order the caller after all of them

A caller keeps a tile's tensor alive until it waited for its handle (``wait`` or ``wait_all``: the block and the
sublayer chain do), so the paths need not ``record_stream`` it: under CUDA-graph capture a recorded stream
keeps the allocator from reusing any of a prefill's freed buffers until the capture ends.

Whole tensors (decode's all-reduces, the vocabulary-parallel embedding and LM head):

  ``all_reduce(t)``            sum ``t`` over the group in place; the caller's later work sees the sum
  ``all_gather(t)``            ``t`` of every rank, concatenated along the last dimension, in rank order

Paths: ``ProcessGroupAllReduce`` (here: NCCL on GPUs, gloo on CPU, optionally paced by a simulated
``LinkModel``), ``NoComm`` (comm off: a rank's compute alone), ``CopyEngineAllReduce`` (copy_engine.py) and
``StandInAllReduce`` (emulated_comm.py, a modelled all-reduce for emulating one rank of a TP group on one GPU).
``comm_paths.make_comm`` builds the real ones by name; the real paths never import the stand-in.

On CUDA a tile's collective is issued from a dedicated high-priority comm stream that first waits for the
stream that computed the tile (an event, no host sync). On CPU (gloo) the transfer runs on gloo's own thread
while the caller computes the next tile: the simulated device's comm engine. With a ``LinkModel`` each handle
also carries a modelled completion time: the link is busy for ``latency + bytes / bandwidth`` per transfer,
transfers queue on it, and ``wait`` sleeps until the later of the real and the modelled completion.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.distributed as dist

from .link_models import LinkModel, nvlink_model


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


class LinkQueue:
    """One rank's simulated link: transfers run one after another, each ``link.allreduce_seconds`` long."""

    def __init__(self, link: LinkModel, world_size: int) -> None:
        self.link, self.world_size, self._free_at = link, world_size, 0.0

    def book(self, h: "CommHandle", now: float) -> None:
        """Put ``h``'s transfer on the link: when it starts (the link is free) and when it ends (modelled)."""
        h.link_start = max(now, self._free_at)
        h.modeled_end = h.link_start + self.link.allreduce_seconds(h.nbytes, self.world_size)
        self._free_at = h.modeled_end

    def transfer(self, nbytes: int) -> None:
        """A whole-tensor collective: wait for the link, then for the transfer (a sleep)."""
        h = CommHandle(-1, nbytes)
        self.book(h, time.perf_counter())
        h.wait()


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


@runtime_checkable
class CommPath(Protocol):
    """What the block and the model need of a comm path (see the module docstring). ``model``: the path's time
    model for the cost model (a ``GpuLinkModel`` for the stand-in), or None (the device profile's);
    ``sm_fraction``: the share of SMs a collective holds while it runs."""

    world_size: int
    rank: int

    @property
    def sm_fraction(self) -> float: ...

    @property
    def model(self): ...

    def enable_timing(self, on: bool = True) -> None: ...

    def prepare(self, out: torch.Tensor, slot: int = 0) -> torch.Tensor: ...

    def start(self, piece: torch.Tensor, tile: int, rows=None) -> "CommHandle": ...

    def wait(self, handle: "CommHandle") -> None: ...

    def wait_all(self, handles: Sequence["CommHandle"]) -> None: ...

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, t: torch.Tensor) -> torch.Tensor: ...


class InPlaceComm:
    """What the paths whose all-reduce works in place share: compute writes the tiles' partial sums into ``out``
    itself, and timing is a flag each path reads its own way."""

    _timing = False

    def enable_timing(self, on: bool = True) -> None:
        """Record per-tile comm spans (CUDA events on the comm stream, gloo callbacks, the modelled link's)."""
        self._timing = on

    def prepare(self, out: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """Where compute writes the tiles' partial sums: ``out`` itself."""
        return out


def group_world_rank(group=None) -> tuple:
    """(world size, rank) of ``group``, or (1, 0) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


class ProcessGroupAllReduce(InPlaceComm):
    """Issues the tiles' all-reduces in order on one process group (and, on CUDA, one comm stream)."""

    model = None  # the cost model uses the device profile's comm figures (and the link's, on CPU)

    def __init__(self, group=None, link: Optional[LinkModel] = None, device: Optional[torch.device] = None) -> None:
        self.group = group
        self.world_size, self.rank = group_world_rank(group)
        self.link = link if (link is not None and link.active) else None
        self.device = device if device is not None else torch.device("cpu")
        self._queue = LinkQueue(self.link, self.world_size) if self.link is not None else None
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
        return nvlink_model(self.world_size).ctas / _sm_count(self.device)

    def start(self, tensor: torch.Tensor, tile: int, rows=None) -> CommHandle:
        h = CommHandle(tile, tensor.numel() * tensor.element_size())
        if self.world_size == 1:
            return h
        if self._stream is not None:
            with on_comm_stream(h, self._stream, self.device, self._timing):
                work = dist.all_reduce(tensor, group=self.group, async_op=True)
                work.wait()  # the comm stream (not the host) waits for NCCL's stream
            return h
        now = time.perf_counter()
        h.issue_time = now
        h.work = dist.all_reduce(tensor, group=self.group, async_op=True)
        if self._timing:
            h.work.get_future().add_done_callback(h._mark_done)
        if self._queue is not None:
            self._queue.book(h, now)
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

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In place, ordered on the caller's stream (NCCL), or done when it returns (gloo; paced by the link)."""
        if self.world_size > 1:
            dist.all_reduce(t, group=self.group)
            if self._queue is not None and self._stream is None:
                self._queue.transfer(t.numel() * t.element_size())
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class NoComm(InPlaceComm):
    """Comm off: each rank keeps its own partial sums. Times the compute of a TP rank alone (bench, tune, an
    emulated model's compute). ``all_gather`` returns this rank's part ``world_size`` times (the shape a real
    gather gives; the other ranks' values do not exist here)."""

    sm_fraction = 0.0
    model = None

    def __init__(self, world_size: int = 1, rank: int = 0) -> None:
        self.world_size, self.rank = world_size, rank

    def start(self, piece: torch.Tensor, tile: int, rows=None) -> CommHandle:
        return CommHandle(tile, piece.numel() * piece.element_size())

    def wait(self, handle: CommHandle) -> None:
        pass

    def wait_all(self, handles) -> None:
        pass

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world_size == 1 else t.repeat(*([1] * (t.dim() - 1)), self.world_size)
