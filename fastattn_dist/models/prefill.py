"""A prefill's sublayer chain: every sublayer of every layer, tile by tile, each tile waiting only for its own rows.

The token rows are cut into tiles once (the model's plan) and every sublayer runs them: tile i of sublayer k
waits for the all-reduce of tile i of sublayer k - 1 only, adds it to the residual stream, normalises, computes
(attention or the MLP) and issues its own all-reduce through the tiled row-parallel projection. Causality makes
this legal (tile i of an attention sublayer needs the keys of rows up to its own, written by this and earlier
tiles), so the all-reduces of one sublayer hide under the next sublayer's compute and a prefill leaves about one
tile's all-reduce exposed in total, not one per sublayer.

Two schedules:

* ``"one"``: sublayer by sublayer, each one's tiles in order on the caller's stream (CPU ranks: gloo's thread
  moves the data meanwhile).
* ``"wavefront"`` (CUDA; on CPU the same order on one thread, for tests): tile i runs on its own stream and the work is issued by anti-diagonals (sublayer k of
  tile i beside sublayer k + 1 of tile i - 1), so a tile's kernels fill the SMs another tile's leave idle: the
  tile tax of narrow tiles (each kernel draining the GPU before the next) is hidden, not paid. A tile's
  attention waits for the earlier tiles' keys of its layer (kv.TileOrder); everything else of tile i lives on
  stream i. Consecutive sublayers write two alternating output buffers: sublayer k + 2 rewrites tile i's rows
  only after sublayer k + 1 consumed them, on the same stream.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from ..kv import TileOrder
from ..parallel.comm import CommHandle, CommPath
from ..parallel.layers import TiledRowParallelLinear, TileStreams
from ..parallel.tile_plan import TilePlan
from ..recorder import span
from .layers import fused_kernels, rms_norm

SCHEDULES = ("one", "wavefront")
# (tile, first row, end row, normalised input rows, the tiles' key order or None) -> the projection's input rows
TileInput = Callable[[int, int, int, torch.Tensor, Optional[TileOrder]], torch.Tensor]


@dataclass
class Sublayer:
    """One step of the chain: the norm before it, its per-tile compute and the projection that reduces it.
    ``reads_keys``: its tiles read earlier tiles' keys (attention), so on several streams they are ordered."""

    name: str
    norm: torch.Tensor
    tile_input: TileInput
    out_proj: TiledRowParallelLinear
    reads_keys: bool = False


@dataclass
class Reduced:
    """A sublayer's output rows, all-reduced tile by tile: what the next sublayer's tiles add to the residual."""

    handles: List[Optional[CommHandle]]
    out: torch.Tensor
    bias: Optional[torch.Tensor]


class SublayerChain:
    """Runs sublayers over a residual stream ``h`` ``[rows, hidden]`` with one tile plan (module docstring)."""

    def __init__(self, comm: CommPath, eps: float, recorder=None, streams: Optional[TileStreams] = None,
                 schedule: str = "one") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"the prefill schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.comm, self.eps, self.recorder, self.streams, self.schedule = comm, eps, recorder, streams, schedule

    def _on(self, i: int):
        """Tile i's stream (CUDA), or the caller's (CPU: the wavefront's order alone, for tests)."""
        return torch.cuda.stream(self.streams.get(i)) if self.streams is not None else contextlib.nullcontext()

    def _take(self, h: torch.Tensor, prev: Optional[Reduced], i: int, r0: int, r1: int,
              norm: Optional[torch.Tensor]):
        """Tile i's rows of the previous sublayer are reduced: add them to ``h``; with ``norm`` return the
        normalised rows too (one fused kernel on GPUs)."""
        if prev is not None:
            self.comm.wait(prev.handles[i])
        if norm is not None and fused_kernels(h.device, h.dtype):
            from .triton_fused import add_rms_norm  # Triton is optional: its kernels load where they run
            return add_rms_norm(h[r0:r1], norm, self.eps, delta=None if prev is None else prev.out[r0:r1],
                                bias=None if prev is None else prev.bias)
        if prev is not None:
            out = prev.out[r0:r1]
            h[r0:r1] += out if prev.bias is None else out + prev.bias
        return None if norm is None else rms_norm(h[r0:r1], norm, self.eps)

    def _step(self, h, sub: Sublayer, prev: Optional[Reduced], cur: Reduced, partials, i: int, r0: int, r1: int,
              order: Optional[TileOrder]) -> None:
        x = self._take(h, prev, i, r0, r1, sub.norm)
        x = sub.tile_input(i, r0, r1, x, order)
        cur.handles[i] = sub.out_proj.run_tile(i, r0, r1, x, partials, self.comm, self.recorder, sub.name)

    def run(self, h: torch.Tensor, plan: TilePlan, sublayers: Sequence[Sublayer]) -> List[CommHandle]:
        """``h`` updated in place by every sublayer; returns every all-reduce's handle (for the profiler)."""
        T, K = plan.num_tiles, len(sublayers)
        ring = [torch.empty_like(h) for _ in range(min(2, K))]  # sublayer k writes ring[k % 2] (module docstring)
        red = [Reduced([None] * T, ring[k % 2], sub.out_proj.bias) for k, sub in enumerate(sublayers)]
        # consecutive sublayers alternate between the comm path's buffers too (the copy-engine path's symmetric
        # memory, prepared right before each sublayer); a path with buffers of its own runs the tiles in order, as
        # its buffers' protocol assumes
        in_place = self.comm.prepare(ring[0], 0) is ring[0]
        wave = self.schedule == "wavefront" and T > 1 and in_place
        orders = [TileOrder(T, h.device) if wave and sub.reads_keys else None for sub in sublayers]
        if not wave:
            for k, sub in enumerate(sublayers):
                part = self.comm.prepare(ring[k % 2], k % 2)
                for i, (r0, r1) in enumerate(plan.ranges):
                    self._step(h, sub, red[k - 1] if k else None, red[k], part, i, r0, r1, orders[k])
            for i, (r0, r1) in enumerate(plan.ranges):
                self._take(h, red[-1], i, r0, r1, None)
        else:
            main = self.streams.fork(T) if self.streams is not None else None
            for d in range(K + T - 1):  # anti-diagonals; within one, the earlier sublayer first
                for i in reversed(range(T)):
                    k = d - i
                    if 0 <= k < K:
                        r0, r1 = plan.ranges[i]
                        with self._on(i):
                            self._step(h, sublayers[k], red[k - 1] if k else None, red[k], ring[k % 2], i, r0, r1,
                                       orders[k])
            for i, (r0, r1) in enumerate(plan.ranges):
                with self._on(i):
                    self._take(h, red[-1], i, r0, r1, None)
            if main is not None:
                self.streams.join(main, T)
        handles = [hd for r in red for hd in r.handles]
        self.comm.wait_all(handles)
        return handles


def attention_step(layer, kv_layer, seq_len: int, start: int, positions: torch.Tensor, mask, recorder) -> Sublayer:
    """The attention sublayer of ``layer`` as a chain step: its tiles write their keys into ``kv_layer`` (a KV sink)."""
    attn = layer.attn
    attn.recorder = recorder

    def tile_input(i: int, r0: int, r1: int, x: torch.Tensor, order: Optional[TileOrder]) -> torch.Tensor:
        return attn.tile_rows(x, r0, r1, seq_len, kv_layer, mask, positions, start, i, order)
    return Sublayer("o_proj", layer.input_norm, tile_input, attn.o_proj, reads_keys=True)


def mlp_step(layer, recorder) -> Sublayer:
    mlp = layer.mlp

    def tile_input(i: int, r0: int, r1: int, x: torch.Tensor, order: Optional[TileOrder]) -> torch.Tensor:
        with span(recorder, "mlp", i):
            return mlp.activation(x)
    return Sublayer("down_proj", layer.post_norm, tile_input, mlp.down)
