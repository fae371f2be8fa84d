"""A prefill's sublayer chain: every sublayer of every layer, tile by tile, each tile waiting only for its own rows.

The token rows are cut into tiles once (the model's plan) and every sublayer runs them in order: tile i of
sublayer k waits for the all-reduce of tile i of sublayer k - 1 only, adds it to the residual stream,
normalises, computes (attention or the MLP) and issues its own all-reduce through the tiled row-parallel
projection. Causality makes this legal (tile i of an attention sublayer needs the keys of rows up to its own,
written by this and earlier tiles), so the all-reduces of one sublayer hide under the next sublayer's compute
and a prefill leaves about one tile's all-reduce exposed in total, not one per sublayer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from ..parallel.comm import CommHandle, CommPath
from ..parallel.layers import TiledRowParallelLinear
from ..parallel.tile_plan import TilePlan
from ..recorder import span
from .layers import fused_kernels, rms_norm

# (tile, first row, end row, normalised input rows) -> the sublayer's projection input rows
TileInput = Callable[[int, int, int, torch.Tensor], torch.Tensor]


@dataclass
class Sublayer:
    """One step of the chain: the norm before it, its per-tile compute and the projection that reduces it."""

    name: str
    norm: torch.Tensor
    tile_input: TileInput
    out_proj: TiledRowParallelLinear


class SublayerChain:
    """Runs sublayers over a residual stream ``h`` ``[rows, hidden]`` with one tile plan (module docstring)."""

    def __init__(self, comm: CommPath, eps: float, recorder=None) -> None:
        self.comm, self.eps, self.recorder = comm, eps, recorder
        self._prev: Optional[tuple] = None  # (handles, reduced output, bias) of the previous sublayer

    def _take_previous(self, h: torch.Tensor, i: int, r0: int, r1: int, norm: Optional[torch.Tensor]):
        """Tile i's rows of the previous sublayer are reduced: add them to ``h``; with ``norm`` return the
        normalised rows too (one fused kernel on GPUs)."""
        prev = self._prev
        if prev is not None:
            self.comm.wait(prev[0][i])
        if norm is not None and fused_kernels(h.device, h.dtype):
            from .triton_fused import add_rms_norm  # Triton is optional: its kernels load where they run
            return add_rms_norm(h[r0:r1], norm, self.eps, delta=None if prev is None else prev[1][r0:r1],
                                bias=None if prev is None else prev[2])
        if prev is not None:
            out = prev[1][r0:r1]
            h[r0:r1] += out if prev[2] is None else out + prev[2]
        return None if norm is None else rms_norm(h[r0:r1], norm, self.eps)

    def run(self, h: torch.Tensor, plan: TilePlan, sublayers: Sequence[Sublayer]) -> List[CommHandle]:
        """``h`` updated in place by every sublayer; returns every all-reduce's handle (for the profiler)."""
        rows, hidden = h.shape
        handles_all: List[CommHandle] = []
        self._prev = None
        for k, sub in enumerate(sublayers):
            def produce(i: int, r0: int, r1: int, sub=sub) -> torch.Tensor:
                x = self._take_previous(h, i, r0, r1, sub.norm)
                return sub.tile_input(i, r0, r1, x)

            out = torch.empty(rows, hidden, dtype=h.dtype, device=h.device)
            # consecutive sublayers alternate between the comm path's buffers (the copy-engine path's symmetric
            # memory): sublayer k + 2 rewrites rows only after sublayer k + 1 passed them, on every rank
            handles = sub.out_proj.run(plan, produce, out, self.comm, self.recorder, sub.name, "one", slot=k % 2)
            self._prev = (handles, out, sub.out_proj.bias)
            handles_all += handles
        for i, (r0, r1) in enumerate(plan.ranges):
            self._take_previous(h, i, r0, r1, None)
        self.comm.wait_all(handles_all)
        self._prev = None
        return handles_all


def attention_step(layer, kv_layer, seq_len: int, start: int, positions: torch.Tensor, mask, recorder) -> Sublayer:
    """The attention sublayer of ``layer`` as a chain step: its tiles write their keys into ``kv_layer`` (a KV sink)."""
    attn = layer.attn
    attn.recorder = recorder

    def tile_input(i: int, r0: int, r1: int, x: torch.Tensor) -> torch.Tensor:
        return attn.tile_rows(x, r0, r1, seq_len, kv_layer, mask, positions, start, i)
    return Sublayer("o_proj", layer.input_norm, tile_input, attn.o_proj)


def mlp_step(layer, recorder) -> Sublayer:
    mlp = layer.mlp

    def tile_input(i: int, r0: int, r1: int, x: torch.Tensor) -> torch.Tensor:
        with span(recorder, "mlp", i):
            return mlp.activation(x)
    return Sublayer("down_proj", layer.post_norm, tile_input, mlp.down)
