"""The cost model behind ``tiles="auto"``.

Each flattened token row costs
    attention:  4 * local_heads * head_dim * visible_keys(row) / attn_rate
    o_proj:     2 * local_heads * head_dim * hidden / gemm_rate
and each tile adds a fixed ``tile_overhead`` (launches, Python). A tile's all-reduce costs
``latency + 2 (n-1)/n * bytes / bus_bandwidth`` (the larger of the device profile's and the
simulated link's). The model simulates the pipeline (comm of tile i may start when tile i is
computed and the previous comm is done; the block ends when the last comm ends) for every
candidate tile count with the cost-balanced plan, and picks the fastest. It keeps one tile
unless the predicted gain is at least ``min_gain``: tiling never happens where it cannot pay
(world size 1, short sequences where the overhead eats the overlap).

The inputs are fixed per device profile, never measured at run time, so every rank computes
the same plan without talking to the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .config import LinkModel, TilePlanOptions
from .masks import Mask
from .parallel.tiling_allreduce import TilePlan, cost_balanced_plan


@dataclass(frozen=True)
class DeviceProfile:
    """Throughputs the cost model assumes for one device kind."""

    name: str
    attn_flops: float          # attention FLOP/s (our backend on this device)
    gemm_flops: float          # o_proj GEMM FLOP/s
    tile_overhead_s: float     # fixed cost per extra tile
    comm_latency_s: float      # all-reduce latency
    comm_bus_bytes_s: float    # all-reduce bus bandwidth
    min_tile_rows: int = 16    # smallest tile that still runs efficiently


# CPU figures: the torch backend on one core of a recent x86 server, gloo over loopback.
# GPU figures: H100/H200 from our notes (NVLink NCCL) and docs/gpu_block.md (attention: the cudnn
# backend's tiles on an H200, 465-580 TFLOP/s at S >= 8K; per extra tile 150-200 us of compute at
# S = 8K, TP=1, its comm call included, same doc).
PROFILES = {
    "cpu": DeviceProfile("cpu", attn_flops=25e9, gemm_flops=90e9, tile_overhead_s=300e-6,
                         comm_latency_s=100e-6, comm_bus_bytes_s=2e9, min_tile_rows=16),
    "hopper": DeviceProfile("hopper", attn_flops=520e12, gemm_flops=650e12, tile_overhead_s=150e-6,
                            comm_latency_s=15e-6, comm_bus_bytes_s=250e9, min_tile_rows=256),
    "gpu": DeviceProfile("gpu", attn_flops=150e12, gemm_flops=250e12, tile_overhead_s=20e-6,
                         comm_latency_s=20e-6, comm_bus_bytes_s=100e9, min_tile_rows=256),
}


def profile_for(device: torch.device) -> DeviceProfile:
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return PROFILES["hopper" if major >= 9 else "gpu"]
    return PROFILES["cpu"]


@dataclass(frozen=True)
class Prediction:
    plan: TilePlan
    block_s: float      # predicted block time
    compute_s: float    # sum of compute
    comm_s: float       # sum of all-reduce time
    exposed_s: float    # block time not covered by compute


@dataclass(frozen=True)
class BlockCost:
    """Everything the model needs to know about one forward call on one rank."""

    batch: int
    seq: int
    hidden: int
    local_heads: int
    head_dim: int
    world_size: int
    elem_bytes: int

    def row_costs(self, mask: Mask, profile: DeviceProfile) -> torch.Tensor:
        pos = torch.arange(self.seq, dtype=torch.float64)
        keys = mask.visible_keys_per_row(pos, self.seq)
        attn = 4.0 * self.local_heads * self.head_dim * keys / profile.attn_flops
        proj = 2.0 * self.local_heads * self.head_dim * self.hidden / profile.gemm_flops
        return (attn + proj).repeat(self.batch)

    def allreduce_s(self, rows: int, profile: DeviceProfile, link: Optional[LinkModel]) -> float:
        if self.world_size == 1:
            return 0.0
        nbytes = rows * self.hidden * self.elem_bytes
        own = LinkModel(profile.comm_latency_s * 1e6, profile.comm_bus_bytes_s / 1e9)
        t = own.allreduce_seconds(nbytes, self.world_size)
        if link is not None and link.active:
            t = max(t, link.allreduce_seconds(nbytes, self.world_size))
        return t


def simulate(plan: TilePlan, row_cost: torch.Tensor, cost: BlockCost, profile: DeviceProfile,
             link: Optional[LinkModel]) -> Prediction:
    """Predicted timeline of the pipeline for ``plan``."""
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(row_cost, 0)])
    t_compute = 0.0
    t_comm = 0.0
    total_compute = total_comm = 0.0
    for i, (r0, r1) in enumerate(plan.ranges):
        c = float(cum[r1] - cum[r0]) + (profile.tile_overhead_s if i > 0 else 0.0)
        t_compute += c
        total_compute += c
        a = cost.allreduce_s(r1 - r0, profile, link)
        total_comm += a
        t_comm = max(t_compute, t_comm) + a
    block = max(t_compute, t_comm)
    return Prediction(plan, block, total_compute, total_comm, block - total_compute)


def candidate_plans(row_cost: torch.Tensor, options: TilePlanOptions, min_tile_rows: int) -> List[TilePlan]:
    rows = int(row_cost.numel())
    most = max(1, min(options.max_tiles, rows // max(1, min_tile_rows)))
    return [cost_balanced_plan(row_cost, n, options.last_tile_share) for n in range(1, most + 1)]


def choose_plan(cost: BlockCost, mask: Mask, *, profile: DeviceProfile, link: Optional[LinkModel] = None,
                options: TilePlanOptions = TilePlanOptions()) -> Prediction:
    """The plan ``tiles="auto"`` uses: the fastest predicted, or one tile if tiling gains < min_gain."""
    row_cost = cost.row_costs(mask, profile)
    rows = int(row_cost.numel())
    single = simulate(TilePlan.single(rows), row_cost, cost, profile, link)
    if cost.world_size == 1:
        return single
    min_rows = max(options.min_tile_rows, profile.min_tile_rows)
    best = single
    for plan in candidate_plans(row_cost, options, min_rows)[1:]:
        pred = simulate(plan, row_cost, cost, profile, link)
        if pred.block_s < best.block_s:
            best = pred
    if best.block_s > single.block_s * (1.0 - options.min_gain):
        return single
    return best


def fixed_plan(cost: BlockCost, mask: Mask, num_tiles: int, *, profile: DeviceProfile,
               options: TilePlanOptions = TilePlanOptions()) -> TilePlan:
    """The cost-balanced plan for a tile count the user fixed (at most one tile per row)."""
    return cost_balanced_plan(cost.row_costs(mask, profile), num_tiles, options.last_tile_share)

