"""Small value types shared across the package: the simulated link and the tile-plan options."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkModel:
    """A simulated interconnect: each all-reduce takes at least ``latency + bus_bytes / bandwidth``.

    ``bus_bytes = 2 (n - 1) / n * message_bytes`` is what a ring all-reduce moves per rank (the
    nccl-tests "bus bandwidth" convention), so ``gbps`` reads like a link's bus bandwidth.
    Transfers on one rank's link run one after another (a tile waits for the link to be free).
    The wait is a sleep, never a spin: a simulated device's comm engine costs no compute.
    """

    latency_us: float = 0.0
    gbps: float = math.inf

    def __post_init__(self) -> None:
        if not (self.latency_us >= 0 and math.isfinite(self.latency_us)):
            raise ValueError(f"link latency must be a finite number >= 0 us, got {self.latency_us}")
        if not (self.gbps > 0):
            raise ValueError(f"link bandwidth must be > 0 GB/s, got {self.gbps}")

    def allreduce_seconds(self, nbytes: int, world_size: int) -> float:
        if world_size <= 1:
            return 0.0
        bus_bytes = 2.0 * (world_size - 1) / world_size * nbytes
        return self.latency_us * 1e-6 + bus_bytes / (self.gbps * 1e9)

    @property
    def active(self) -> bool:
        return self.latency_us > 0 or math.isfinite(self.gbps)


@dataclass(frozen=True)
class TilePlanOptions:
    """Knobs of the tile plan (see tuning.py for how ``tiles="auto"`` uses them).

    max_tiles:      the most tiles ``auto`` considers.
    min_tile_rows:  no tile smaller than this (keeps each tile's work efficient).
    last_tile_share: the last tile's cost relative to the others; < 1 shrinks the last tile,
                    whose all-reduce nothing can hide.
    min_gain:       ``auto`` tiles only if the model predicts at least this fractional gain.
    """

    max_tiles: int = 16
    min_tile_rows: int = 16
    last_tile_share: float = 0.5
    min_gain: float = 0.03

    def __post_init__(self) -> None:
        if self.max_tiles < 1 or self.min_tile_rows < 1:
            raise ValueError("max_tiles and min_tile_rows must be >= 1")
        if not (0 < self.last_tile_share <= 1):
            raise ValueError("last_tile_share must be in (0, 1]")
