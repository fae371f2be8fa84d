"""A modelled all-reduce on one GPU: the comm stand-in for emulating one rank of a TP group.

The GPU twin of the CPU ``LinkModel``. Multi-GPU machines are not always at hand, so one rank of a
TP=N group can be emulated on one GPU: the block runs with that rank's shape, and each tile's
all-reduce is replaced by work on the comm stream that lasts what the modelled all-reduce would,

    seconds = latency + 2 (N - 1) / N * bytes / bandwidth        (ring all-reduce, nccl-tests' bus bytes)

and holds what the real path holds:

* ``path="nccl"``: a kernel of ``ctas`` CTAs (NCCL's channels, ``threads`` threads each) that
  reads and writes the tile's bus bytes in device memory and stays resident until the modelled
  time has passed since it started. Fewer CTAs than ``full_bw_ctas`` get proportionally less
  bandwidth (each channel moves a share), so squeezing NCCL onto few SMs costs comm time.
* ``path="copy_engine"``: copy-engine copies of the bus bytes (no SMs), spread over several streams
  so the copy engines work in parallel, beside a one-warp timer kernel that ends when the modelled
  time has passed.

It is a model, not a measurement: the time model is ``link_models.GpuLinkModel`` (fits to NCCL all-reduces
of 16-512 MB measured on H200 NVLink nodes, a small-message latency from public figures below 256 KiB);
docs/gpu_emulation.md says how, and a multi-GPU run replaces them by measurement. The data is not reduced: an
emulated rank keeps its own partial sums, and ``all_gather`` returns its own part once per rank.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .comm import CommHandle, InPlaceComm, LinkQueue, comm_stream, on_comm_stream
from .link_models import GpuLinkModel, LinkModel

CE_STREAMS = 4  # copy streams of the copy-engine stand-in
# Local device-to-device copies ran at 170-213 GB/s on an H100 (2026-11-25), slower than the modelled links
# for large tiles: the copy-engine stand-in copies at most what 100 GB/s moves in the modelled time, so its
# length stays the model's (its copies stand for the memory traffic, not the timing).
CE_COPY_BYTES_S = 100e9


# ------------------------------------------------------------------------------------------------
# The kernels (Triton; imported lazily so CPU-only installs never need them).
# ------------------------------------------------------------------------------------------------
_KERNELS = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        import triton  # an optional extra, and the kernel only runs on a GPU: built on first use
        import triton.language as tl  # (the same)
        from triton.language.extra.cuda import globaltimer  # (the same)

        @triton.jit(do_not_specialize=["n_words", "bus_words", "duration_ns"])
        def hold(src, dst, n_words, bus_words, duration_ns, trace, BLOCK: tl.constexpr, TRACE: tl.constexpr):
            # Each CTA: move its share of the bus bytes (src -> dst, wrapping over the tile's words),
            # then stay resident until ``duration_ns`` has passed since it started.
            t0 = globaltimer()
            pid = tl.program_id(0)
            step = tl.num_programs(0) * BLOCK
            offs = tl.arange(0, BLOCK)
            for start in range(pid * BLOCK, bus_words, step):
                idx = (start + offs) % n_words
                ok = start + offs < bus_words
                tl.store(dst + idx, tl.load(src + idx, mask=ok), mask=ok)
            t1 = globaltimer()
            while globaltimer() - t0 < duration_ns:
                pass
            if TRACE:  # when this CTA started, finished its copy, and left (ns, GPU clock)
                tl.store(trace + pid * 3, t0)
                tl.store(trace + pid * 3 + 1, t1)
                tl.store(trace + pid * 3 + 2, globaltimer())

        _KERNELS = hold
    return _KERNELS


def _words(t: torch.Tensor) -> torch.Tensor:
    """A flat view of ``t``'s bytes in the widest word that divides them."""
    flat = t.reshape(-1).view(torch.uint8)
    for dt, size in ((torch.int32, 4), (torch.int16, 2)):
        if flat.numel() % size == 0 and flat.data_ptr() % size == 0:
            return flat.view(dt)
    return flat


class StandInAllReduce(InPlaceComm):
    """The comm interface of comm.py (``CommPath``) with modelled collectives.

    ``world_size`` is the emulated group's; this process is its rank 0. Each ``start`` issues the
    stand-in on the comm stream (high priority, as our NCCL comm stream) after the compute that
    produced the tile; ``wait_all`` orders the caller's stream after all of them. ``all_reduce`` and
    ``all_gather`` (decode, embedding, LM head) run it on the caller's stream, which waits for them as it
    waits for NCCL. CUDA-graph safe.
    """

    def __init__(self, world_size: int, model: Optional[GpuLinkModel] = None, device: Optional[torch.device] = None) -> None:
        self.model = model if model is not None else GpuLinkModel.for_world_size(world_size)
        self.world_size = world_size
        self.rank = 0
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        if self.device.type != "cuda":
            raise ValueError("the GPU comm stand-in needs a CUDA device; CPU ranks use LinkModel")
        self._stream = comm_stream(self.device)
        self._ce_streams = [comm_stream(self.device) for _ in range(CE_STREAMS)]
        self._timing = False
        self.trace: Optional[torch.Tensor] = None  # int64 [ctas * 3]: per-CTA start, copy end, exit (diagnostics)

    @property
    def sm_fraction(self) -> float:
        """The share of SMs the modelled collective holds while it runs (cost model)."""
        if self.model.path != "nccl":
            return 0.0
        return self.model.ctas / torch.cuda.get_device_properties(self.device).multi_processor_count

    def issue(self, piece: torch.Tensor, seconds: Optional[float] = None) -> None:
        """Enqueue one modelled all-reduce of ``piece`` on the current stream (the caller picks it); ``seconds``:
        how long it lasts instead (an all-gather's time)."""
        m = self.model
        if seconds is None:
            seconds = m.allreduce_seconds(piece.numel() * piece.element_size(), self.world_size)
        src = _words(piece)
        dst = torch.empty_like(src)  # per call: a captured graph owns its own (graph memory pool)
        bus_words = m.bus_bytes(src.numel(), self.world_size)
        hold = _kernels()
        if m.path == "nccl":
            hold[(m.ctas,)](src, dst, src.numel(), bus_words, int(seconds * 1e9), self.trace, BLOCK=16 * m.threads,
                            TRACE=self.trace is not None, num_warps=m.threads // 32)
            return
        # copy engines move the bytes (no SMs); one warp marks when the modelled time is up
        cur = torch.cuda.current_stream(self.device)
        bus_words = min(bus_words, int(seconds * CE_COPY_BYTES_S) // src.element_size())
        chunk = -(-bus_words // len(self._ce_streams))
        for j, st in enumerate(self._ce_streams):  # the bus words, a share per stream, wrapping over the tile
            st.wait_stream(cur)
            with torch.cuda.stream(st):
                pos, end = j * chunk, min(bus_words, (j + 1) * chunk)
                while pos < end:
                    a = pos % src.numel()
                    n = min(end - pos, src.numel() - a)
                    dst[a:a + n].copy_(src[a:a + n], non_blocking=True)
                    pos += n
        hold[(1,)](src, dst, src.numel(), 0, int(seconds * 1e9), self.trace, BLOCK=32, TRACE=self.trace is not None,
                   num_warps=1)
        for st in self._ce_streams:
            cur.wait_stream(st)

    def start(self, piece: torch.Tensor, tile: int, rows=None) -> CommHandle:
        h = CommHandle(tile, piece.numel() * piece.element_size())
        with on_comm_stream(h, self._stream, self.device, self._timing):
            self.issue(piece)
        return h  # the caller keeps ``piece`` alive until it waited for ``h`` (comm.py)

    def wait(self, handle: CommHandle) -> None:
        torch.cuda.current_stream(self.device).wait_event(handle.done)

    def wait_all(self, handles) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.issue(t)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.issue(t, self.model.allgather_seconds(t.numel() * t.element_size(), self.world_size))
        return t.repeat(*([1] * (t.dim() - 1)), self.world_size)


class LinkStandIn(InPlaceComm):
    """The stand-in on CPU: this process plays rank 0 of a TP group of ``world_size`` whose collectives take what
    the simulated link says (sleeps, no CPU burnt; the data is not reduced). The code path of an emulated rank
    (``bench-model --emulate-tp N`` on CPU), not a measurement of anything."""

    sm_fraction = 0.0

    def __init__(self, world_size: int, link: LinkModel) -> None:
        self.world_size, self.rank, self.model = world_size, 0, link
        self._queue = LinkQueue(link, world_size)
        self._timing = False

    def start(self, piece: torch.Tensor, tile: int, rows=None) -> CommHandle:
        h = CommHandle(tile, piece.numel() * piece.element_size())
        h.issue_time = time.perf_counter()
        self._queue.book(h, h.issue_time)
        return h

    def wait(self, handle: CommHandle) -> None:
        handle.wait()

    def wait_all(self, handles) -> None:
        for h in handles:
            h.wait()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._queue.transfer(t.numel() * t.element_size())
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self._queue.transfer(t.numel() * t.element_size() * self.world_size // 2)  # half an all-reduce's bus bytes
        return t.repeat(*([1] * (t.dim() - 1)), self.world_size)
