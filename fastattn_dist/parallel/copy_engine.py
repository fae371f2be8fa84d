"""All-reduce of a tile through copy engines: symmetric memory, pull-based, intra-node only.

NCCL's all-reduce kernels occupy SMs that the next tile's attention wants (the SM share in docs/tiling.md).
Here the o_proj partials are written straight into a symmetric buffer that every rank of the node
can address, and per tile, on the comm stream:

  1. barrier: every rank's partial rows of this tile are written;
  2. reduce-scatter by pulling: rank r owns chunk r of the tile's rows; it copies chunk r of every
     rank's buffer (peer-to-peer memcpy: the copy engines, not SMs) into a staging buffer, sums
     the n copies in rank order (one small memory-bound kernel) and writes the sum to its own
     buffer and to the output;
  3. barrier: every chunk is reduced;
  4. all-gather by pulling: copy each peer's reduced chunk into the output (copy engines again).

Each chunk is summed by one rank only, so every rank ends with the same bits. A last barrier at
the end of the block keeps a rank from overwriting its buffer while a peer still reads it. All
barriers carry a timeout, so a dead peer turns into an error, not a hang.

A model's prefill chains sublayers without that end barrier: consecutive sublayers write alternate buffers
(``prepare(out, slot)``, slot = sublayer index mod 2). Sublayer k + 2 rewrites sublayer k's rows of tile i only
after this rank finished sublayer k + 1's all-reduce of tile i, whose first barrier every peer passes only
after its own comm stream finished pulling sublayer k's tile i: so no peer still reads them.
Whole-tensor collectives (decode, the embedding, the LM head) go through the process group.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist

from .comm import CommHandle, comm_stream, on_comm_stream

BARRIER_TIMEOUT_MS = 120_000


def chunk_bounds(r0: int, r1: int, world_size: int) -> List[Tuple[int, int]]:
    """Rows [r0, r1) split into ``world_size`` contiguous chunks; chunk p is reduced by rank p."""
    n = r1 - r0
    return [(r0 + p * n // world_size, r0 + (p + 1) * n // world_size) for p in range(world_size)]


def copy_engine_available(device: torch.device, group=None) -> bool:
    """Symmetric memory needs CUDA peer access between all ranks of the group (one node)."""
    if device.type != "cuda" or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return True


class CopyEngineAllReduce:
    """The comm interface of comm.py (prepare / start / wait / wait_all) over symmetric memory."""

    sm_fraction = 0.0  # copies run on copy engines; the barrier and sum kernels are a few small blocks
    model = None
    SLOTS = 2

    def __init__(self, group=None, device: torch.device = None) -> None:
        import torch.distributed._symmetric_memory as symm_mem  # private, CUDA-only: loaded where it runs

        self._symm_mem = symm_mem
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.device = device
        self._stream = comm_stream(device)
        self._sets = {}  # (rows, cols, dtype) -> symmetric buffer set; kept, since captured graphs point at them
        self._out = None

    def enable_timing(self, on: bool = True) -> None:
        self._timing = on

    def _buffers(self, rows: int, cols: int, dtype: torch.dtype, slot: int):
        key = (rows, cols, dtype, slot % self.SLOTS)
        if key not in self._sets:  # collective: every rank sees the same shapes in the same order
            enable = getattr(self._symm_mem, "enable_symm_mem_for_group", None)
            if enable is not None:
                enable(self.group.group_name)
            buf = self._symm_mem.empty(rows, cols, dtype=dtype, device=self.device)
            handle = self._symm_mem.rendezvous(buf, self.group)
            peers = [handle.get_buffer(p, (rows, cols), dtype) for p in range(self.world_size)]
            most = -(-rows // self.world_size)
            staging = torch.empty(self.world_size, most, cols, dtype=dtype, device=self.device)
            self._sets[key] = (buf, handle, peers, staging)
        self._buf, self._handle, self._peers, self._staging = self._sets[key]
        return self._buf

    def prepare(self, out: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """Where compute writes the partial sums: this rank's symmetric buffer of ``slot`` (``out`` gets the
        result)."""
        self._out = out
        return self._buffers(out.shape[0], out.shape[1], out.dtype, slot)

    def start(self, piece: torch.Tensor, tile: int, rows: Tuple[int, int]) -> CommHandle:
        h = CommHandle(tile, piece.numel() * piece.element_size())
        r0, r1 = rows
        chunks = chunk_bounds(r0, r1, self.world_size)
        c0, c1 = chunks[self.rank]
        out, bar, buf, peers, staging_all = self._out, self._handle.barrier, self._buf, self._peers, self._staging
        with on_comm_stream(h, self._stream, self.device, getattr(self, "_timing", False)):
            bar(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
            if c1 > c0:
                staging = staging_all[:, : c1 - c0]
                for p in range(self.world_size):
                    staging[p].copy_(peers[p][c0:c1], non_blocking=True)
                torch.sum(staging, dim=0, out=out[c0:c1])
                buf[c0:c1].copy_(out[c0:c1], non_blocking=True)
            bar(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
            for p, (p0, p1) in enumerate(chunks):
                if p != self.rank and p1 > p0:
                    out[p0:p1].copy_(peers[p][p0:p1], non_blocking=True)
        return h

    def wait(self, handle: CommHandle) -> None:
        torch.cuda.current_stream(self.device).wait_event(handle.done)

    def wait_all(self, handles) -> None:
        with torch.cuda.stream(self._stream):
            # Nobody rewrites its buffer (next block) while a peer may still be pulling from it.
            self._handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self._out.record_stream(self._stream)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
