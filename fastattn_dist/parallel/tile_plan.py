"""tiling-AllReduce: the tile plan over token rows.

The block's token rows (batch x seq, flattened) are cut into tiles; ``TilePlan`` holds the cuts,
``cost_balanced_plan`` places them by cost, ``tile_segments`` maps a tile back to sequences. The
pipeline that runs a plan (tile i: produce its rows -> GEMM -> asynchronous all-reduce, while tile
i+1 computes) is the tiled row-parallel linear, row_parallel.py; it knows nothing of attention
backends: it calls back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch


@dataclass(frozen=True)
class TilePlan:
    """Tile boundaries over ``rows`` flattened token rows: tile i is rows [bounds[i], bounds[i+1])."""

    bounds: Tuple[int, ...]

    def __post_init__(self) -> None:
        b = self.bounds
        if len(b) < 2 or b[0] != 0 or any(b[i] >= b[i + 1] for i in range(len(b) - 1)):
            raise ValueError(f"tile bounds must start at 0 and increase strictly, got {b}")

    @property
    def rows(self) -> int:
        return self.bounds[-1]

    @property
    def num_tiles(self) -> int:
        return len(self.bounds) - 1

    @property
    def ranges(self) -> List[Tuple[int, int]]:
        return [(self.bounds[i], self.bounds[i + 1]) for i in range(self.num_tiles)]

    @classmethod
    def single(cls, rows: int) -> "TilePlan":
        return cls((0, rows))


def cost_balanced_plan(row_cost: torch.Tensor, num_tiles: int, last_tile_share: float = 0.5,
                       align: int = 1) -> TilePlan:
    """Cut rows so every tile but the last carries equal cost and the last ``last_tile_share`` of that.

    ``row_cost`` (one float per row) is what a row costs to compute: under a causal mask later rows
    see more keys, so equal-cost tiles have fewer rows towards the end. The small last tile shortens
    the one all-reduce that no compute can hide. ``align``: cuts at multiples of this many rows (a GPU's
    kernels work in blocks of rows: a tile that ends inside one pays for the whole block).
    """
    rows = int(row_cost.numel())
    n = max(1, min(int(num_tiles), rows))
    if n == 1:
        return TilePlan.single(rows)
    cum = torch.cumsum(row_cost.double().clamp(min=1e-12), 0)
    total = float(cum[-1])
    unit = total / (n - 1 + last_tile_share)
    targets = torch.tensor([unit * k for k in range(1, n)], dtype=torch.float64)
    cuts = (torch.searchsorted(cum, targets) + 1).tolist()
    bounds = [0]
    for i, c in enumerate(cuts):
        c = int(c)
        if align > 1 and c > align:
            c = int(round(c / align)) * align
        # Keep at least one row per tile, both before and after this cut.
        lo, hi = bounds[-1] + 1, rows - (n - 1 - i)
        bounds.append(min(max(c, lo), hi))
    bounds.append(rows)
    return TilePlan(tuple(bounds))


def tile_segments(r0: int, r1: int, seq_len: int) -> Iterator[Tuple[int, int, int, int]]:
    """Split flat rows [r0, r1) into pieces ``(b0, b1, s0, s1)``: sequences b0..b1-1, positions s0..s1-1.

    A piece is either part of one sequence (b1 = b0 + 1) or whole sequences, so each maps to one
    contiguous slice of the ``[batch * seq, ...]`` buffers.
    """
    r = r0
    while r < r1:
        b, s = divmod(r, seq_len)
        if s == 0 and r1 - r >= seq_len:
            nb = (r1 - r) // seq_len
            yield b, b + nb, 0, seq_len
            r += nb * seq_len
        else:
            e = min(r1, (b + 1) * seq_len)
            yield b, b + 1, s, e - b * seq_len
            r = e

