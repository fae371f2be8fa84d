"""The tiled row-parallel linear: y = sum over ranks of x_local @ W_local^T, all-reduced tile by tile.

Row-parallel (Megatron style): each rank holds the input columns of its share (its heads for o_proj,
its slice of the intermediate size for the MLP's down projection), so its product is a partial sum
of the full output. The token rows are cut into tiles (``TilePlan``); for tile i the caller's
``produce(i, r0, r1)`` computes the tile's input rows (attention, or the MLP's activation), the GEMM
writes the tile's partial sums, and the tile's all-reduce is issued at once, while tile i+1
computes. With one tile this is exactly the sequential layer.

On CUDA the tiles' kernels go to streams by ``tile_streams`` (measured on one H100, docs/gpu_emulation.md):

  "one"      every tile on the caller's stream: each kernel drains the GPU before the next starts.
  "overlap"  tile i on its own stream at a priority below tile i-1's (and the comm stream above all):
             a later tile fills the SMs an earlier one leaves idle. Fastest compute, but tile i+1's
             attention holds the SMs tile i's GEMM needs when it becomes ready, so the all-reduce
             chain starts late: worse when comm is the critical path.
  "staged"   as overlap, but tile i+1's input (its attention) starts only once tile i's is done: tile
             i's GEMM, higher in priority, takes the SMs first, and tile i+1's attention fills its tail.
             At TP >= 4 a late tile's attention is under one wave, and only other attention fills the
             rest: the compute tax stays that of "one".
  "lead"     tile 0 alone on the GPU (its all-reduce, the head of the comm chain, starts as early as it
             can), then tiles 1.. as in overlap (their all-reduces queue behind tile 0's anyway).
On CPU the tiles run in order on the calling thread while gloo's thread moves the data.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

import torch
from torch import nn

from ..profiler.recorder import span
from .comm import CommHandle
from .tiling_allreduce import TilePlan

# PyTorch creates streams at priorities 0 (lowest) to -3 (highest); the comm stream takes -3.
TILE_PRIORITIES = (-2, -1, 0)
TILE_STREAMS = ("one", "overlap", "staged", "lead")


class TileStreams:
    """Compute streams for the tiles of one device: tile i on stream i, priorities falling with i."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._streams: List[torch.cuda.Stream] = []

    def get(self, i: int) -> "torch.cuda.Stream":
        while len(self._streams) <= i:
            prio = TILE_PRIORITIES[min(len(self._streams), len(TILE_PRIORITIES) - 1)]
            self._streams.append(torch.cuda.Stream(device=self.device, priority=prio))
        return self._streams[i]

    def fork(self, n: int) -> "torch.cuda.Stream":
        """Tiles 0..n-1 may start once the caller's stream got here; returns the caller's stream."""
        main = torch.cuda.current_stream(self.device)
        for i in range(n):
            self.get(i).wait_stream(main)
        return main

    def join(self, main: "torch.cuda.Stream", n: int) -> None:
        for i in range(n):
            main.wait_stream(self.get(i))


Produce = Callable[[int, int, int], torch.Tensor]


class TiledRowParallelLinear(nn.Module):
    """A row-parallel linear (``weight``: ``[out_features, in_features_local]``) run tile by tile.

    ``run`` computes every tile's partial sums into ``out`` (``[rows, out_features]``) and issues their
    all-reduces on ``comm``; it returns the handles, so the caller waits for all (``comm.wait_all``) or
    for one tile at a time (``comm.wait``: the next sublayer's tile i needs only this tile i).
    """

    def __init__(self, in_features_local: int, out_features: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features_local, dtype=dtype, device=device),
                                   requires_grad=False)
        self._streams: Optional[TileStreams] = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def streams(self) -> Optional[TileStreams]:
        if self.weight.device.type != "cuda":
            return None
        if self._streams is None:
            self._streams = TileStreams(self.weight.device)
        return self._streams

    @torch.no_grad()
    def run(self, plan: TilePlan, produce: Produce, out: torch.Tensor, comm, recorder=None,
            name: str = "o_proj", tile_streams: str = "one") -> List[CommHandle]:
        """For each tile: ``x = produce(i, r0, r1)`` (``[r1 - r0, in_features_local]``), ``out[r0:r1] = x @ W^T``,
        all-reduce ``out[r0:r1]`` asynchronously; ``tile_streams`` as in the module docstring."""
        n = plan.num_tiles
        partials = comm.prepare(out)  # where the GEMM writes: ``out``, or the copy-engine path's symmetric buffer
        streams = self.streams() if (tile_streams != "one" and n > 1) else None
        main = streams.fork(n) if streams is not None else None
        handles = []
        produced = None  # event: the previous tile's input is complete ("staged")
        for i, (r0, r1) in enumerate(plan.ranges):
            stream = streams.get(i) if streams is not None else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if produced is not None:  # staged: the previous tile's input; lead: tile 0's GEMM
                    stream.wait_event(produced)
                x = produce(i, r0, r1)
                if stream is not None and tile_streams == "staged":
                    produced = torch.cuda.Event()
                    produced.record()
                with span(recorder, name, i):
                    torch.matmul(x, self.weight.t(), out=partials[r0:r1])
                if stream is not None and tile_streams == "lead" and i == 0:
                    produced = torch.cuda.Event()  # tile 1 (and through it the rest) starts after tile 0's GEMM
                    produced.record()
                handles.append(comm.start(partials[r0:r1], i, (r0, r1)))
        if streams is not None:
            streams.join(main, n)
        return handles
