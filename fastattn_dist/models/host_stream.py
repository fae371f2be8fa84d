"""Host-tier blocks streamed to the device: a ring of device slots filled by the copy engine ahead of their use.

A request names a layer, the sequences and a block range of the host tier; it is cut into units of
``unit_blocks`` blocks aligned to multiples of it (so the requests of successive decode steps, whose ranges
grow by a token, share all but their last unit). Each unit is copied on the fetch stream into a free slot, and
``consume`` hands the slot to the caller's work on the current stream once its copy has landed, then frees it
after that work. Streaming does not depend on the query, so ``prefetch`` copies the units of a later request
(the next layer's, the next step's) into the slots as soon as they are free: the copy engine keeps moving while
a layer computes. A copy is issued only when every position it must deliver has been written (``written``:
host positions per layer and sequence whose writes are already enqueued), so no prefetch reads a stale block.

Order of host memory: copies wait (on the device) for the write stream's queued device-to-host writes; host-side
writes (decode's scatter) happen in program order before any copy that reads them is issued. On a CPU-only run
the "device" slots are CPU tensors and every copy is a plain copy (the same code path, for tests).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Unit = Tuple[int, int, int, int, int]   # (layer, b0, b1, first block, end block)


class HostStream:
    """The slots, the fetch stream and what each slot holds (module docstring)."""

    def __init__(self, host_k: List[torch.Tensor], host_v: List[torch.Tensor], written: List[List[int]],
                 unit_blocks: int, slots: int, device: torch.device, write_stream=None) -> None:
        self.host_k, self.host_v, self.written = host_k, host_v, written
        _, B, H, T, D = host_k[0].shape
        self.unit_blocks, self.block_tokens = unit_blocks, T
        shape = (slots, unit_blocks, B, H, T, D)
        self.k = torch.empty(shape, dtype=host_k[0].dtype, device=device)
        self.v = torch.empty(shape, dtype=host_k[0].dtype, device=device)
        cuda = device.type == "cuda"
        self.fetch_stream = torch.cuda.Stream(device) if cuda else None
        self.write_stream = write_stream
        self.ready: List[Optional[torch.cuda.Event]] = [None] * slots
        self.free_after: List[Optional[torch.cuda.Event]] = [None] * slots
        self.held: "OrderedDict[int, Unit]" = OrderedDict()   # slot -> unit, oldest first
        self.timing = False
        self.copy_events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.copy_seconds = 0.0   # CPU-only runs: time of the copies themselves

    # -- units --------------------------------------------------------------------------------------------------
    def units(self, layer: int, b0: int, b1: int, j0: int, j1: int) -> List[Unit]:
        U = self.unit_blocks
        return [(layer, b0, b1, max(j0, u), min(j1, u + U)) for u in range(j0 // U * U, j1, U)]

    def clear(self) -> None:
        """Forget what the slots hold (the host tier is being rewritten: a new prefill), and the copies timed."""
        self.held.clear()
        self.copy_events.clear()
        self.copy_seconds = 0.0

    def _valid(self, unit: Unit, need_end: Sequence[int]) -> bool:
        """Every position the unit must deliver (up to ``need_end`` per sequence) is written."""
        layer, b0, b1, _, j1 = unit
        end = j1 * self.block_tokens
        return all(self.written[layer][b] >= min(need_end[b - b0], end) for b in range(b0, b1))

    # -- copies -------------------------------------------------------------------------------------------------
    def _slot_for(self, keep: Sequence[Unit]) -> Optional[int]:
        """A slot to fill: an empty one, else the oldest holding no unit of ``keep``."""
        for s in range(self.k.shape[0]):
            if s not in self.held:
                return s
        for s, u in self.held.items():
            if u not in keep:
                return s
        return None

    def _issue(self, unit: Unit, slot: int) -> None:
        layer, b0, b1, j0, j1 = unit
        n, nb = b1 - b0, j1 - j0
        src_k, src_v = self.host_k[layer], self.host_v[layer]
        whole = b0 == 0 and b1 == src_k.shape[1]
        if self.fetch_stream is None:
            t0 = time.perf_counter()
            self.k[slot, :nb, :n].copy_(src_k[j0:j1, b0:b1])
            self.v[slot, :nb, :n].copy_(src_v[j0:j1, b0:b1])
            self.copy_seconds += time.perf_counter() - t0
        else:
            with torch.cuda.stream(self.fetch_stream):
                if self.write_stream is not None:
                    self.fetch_stream.wait_stream(self.write_stream)  # device-to-host writes land first
                if self.free_after[slot] is not None:
                    self.fetch_stream.wait_event(self.free_after[slot])
                start = torch.cuda.Event(enable_timing=True) if self.timing else None
                if start is not None:
                    start.record()
                for dst, src in ((self.k, src_k), (self.v, src_v)):
                    if whole:  # one contiguous region: blocks j0..j1 of every sequence
                        dst[slot, :nb].copy_(src[j0:j1], non_blocking=True)
                    else:
                        for j in range(nb):
                            dst[slot, j, :n].copy_(src[j0 + j, b0:b1], non_blocking=True)
                ev = torch.cuda.Event(enable_timing=self.timing)
                ev.record()
                if start is not None:
                    self.copy_events.append((start, ev))
            self.ready[slot] = ev
        self.held.pop(slot, None)
        self.held[slot] = unit

    def prefetch(self, units: Sequence[Unit], need_end: Sequence[int], keep: Optional[Sequence[Unit]] = None) -> None:
        """Copy ``units`` into free slots ahead of their request, as far as slots and written positions allow
        (``need_end[b - b0]``: the host positions each sequence's request reads up to); slots holding a unit of
        ``keep`` (default ``units``) are not taken."""
        keep = units if keep is None else keep
        for unit in units:
            if unit in self.held.values():
                continue
            if not self._valid(unit, need_end):
                return
            slot = self._slot_for(keep)
            if slot is None:
                return
            self._issue(unit, slot)

    def consume(self, units: Sequence[Unit], need_end: Sequence[int],
                work: Callable[[torch.Tensor, torch.Tensor, Unit], None]) -> None:
        """For each unit in order: its slot's K and V ``[nblk, n, Hkv, T, D]`` to ``work`` (run on the current
        stream after the copy lands); the slot is free again once that work has run."""
        cur = torch.cuda.current_stream(self.k.device) if self.fetch_stream is not None else None
        for i, unit in enumerate(units):
            slot = next((s for s, u in self.held.items() if u == unit), None)
            if slot is None:
                slot = self._slot_for(units[i:])
                if slot is None:  # every slot holds a later unit of this request: give up the newest
                    slot = next(reversed(self.held))
                self._issue(unit, slot)
            self.prefetch(units[i + 1:], need_end, keep=units[i:])
            if cur is not None:
                cur.wait_event(self.ready[slot])
            _, b0, b1, j0, j1 = unit
            work(self.k[slot, :j1 - j0, :b1 - b0], self.v[slot, :j1 - j0, :b1 - b0], unit)
            if cur is not None:
                ev = torch.cuda.Event()
                ev.record(cur)
                self.free_after[slot] = ev
            del self.held[slot]

    def busy_seconds(self) -> float:
        """Seconds the copy engine spent on this stream's copies since timing was turned on (syncs once)."""
        if self.fetch_stream is None:
            return self.copy_seconds
        if self.copy_events:
            self.copy_events[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in self.copy_events) / 1e3
