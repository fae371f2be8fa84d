"""The cost model behind ``tiles="auto"``.

Each flattened token row costs
    attention:  4 * local_heads * head_dim * visible_keys(row) / attn_rate
    o_proj:     2 * local_heads * head_dim * hidden / gemm_rate
and each tile after the first adds a fixed ``tile_overhead``. A tile's all-reduce costs
``latency + 2 (n-1)/n * bytes / bus_bandwidth``: the simulated link's or the GPU stand-in's when one
is in use, else the device profile's (on Hopper, fits to NCCL all-reduces measured over NVLink, per
world size). The model simulates the pipeline (tile i's all-reduce starts when tile i is computed and
the previous all-reduce is done; the block ends with the last all-reduce) for candidate plans: for
every tile count the cost-balanced plan, then a local search over its cut points (a comm-bound block
wants a small first tile, so the all-reduces start early; a compute-bound one a small last tile).
It keeps one tile unless the predicted gain is at least ``min_gain``.

``measured.py`` (written by ``fastattn-dist tune``) can replace the compute side by measurement: a measured profile holds, per shape, the
compute time of each plan it timed on this GPU; ``choose_plan`` then simulates those plans with their
measured times, so a plan whose measured tile tax exceeds the comm it hides is never chosen.

Inputs are fixed per device profile (or read from the same profile file), never measured at run time,
so every rank computes the same plan without talking to the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..devices import family_of
from ..masks import Mask
from ..parallel.link_models import LinkModel, nvlink_model, ring_allreduce_seconds
from ..parallel.tile_plan import TilePlan, cost_balanced_plan


@dataclass(frozen=True)
class TilePlanOptions:
    """Knobs of the tile plan (``tiles="auto"``).

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


@dataclass(frozen=True)
class DeviceProfile:
    """Throughputs the cost model assumes for one device kind."""

    name: str
    attn_flops: float          # attention FLOP/s (our backend on this device)
    gemm_flops: float          # o_proj GEMM FLOP/s
    tile_overhead_s: float     # fixed cost per extra tile
    comm_latency_s: float      # all-reduce latency (when ``nvlink`` is off)
    comm_bus_bytes_s: float    # all-reduce bus bandwidth (when ``nvlink`` is off)
    min_tile_rows: int = 16    # smallest tile that still runs efficiently
    row_align: int = 1         # tile cuts at multiples of this many rows (the kernels' row blocks)
    nvlink: bool = False       # NCCL over NVLink: link_models' model of it (fits per world size) instead
    # fixed cost per extra tile of each sublayer of a model's prefill (more kernels per tile than the block:
    # norms, the MLP, KV cache writes); None: tile_overhead_s
    sublayer_tile_overhead_s: Optional[float] = None

    @property
    def stack_tile_overhead_s(self) -> float:
        return self.tile_overhead_s if self.sublayer_tile_overhead_s is None else self.sublayer_tile_overhead_s

    def allreduce_seconds(self, nbytes: int, world_size: int) -> float:
        if self.nvlink:
            return nvlink_model(world_size).allreduce_seconds(nbytes, world_size)
        return ring_allreduce_seconds(nbytes, world_size, self.comm_latency_s, self.comm_bus_bytes_s)


# CPU figures: the torch backend on one core of a recent x86 server, gloo over loopback. The model's per-tile
# overhead is what an extra tile cost per sublayer of the tiny model's prefill with 2 gloo ranks on 2 cores
# (0.6-1 ms, 2026-11-25: its many small ops per tile, and gloo's threads taking the cores from compute while
# transfers overlap it).
# Hopper: attention (cuDNN) and GEMM rates and the per-tile overhead with prioritised tile streams,
# measured on one H100 (docs/gpu_emulation.md); comm: NCCL over NVLink as link_models models it (the fits to
# all-reduces measured on H200 NVLink nodes, the same model as the GPU comm stand-in's).
PROFILES = {
    "cpu": DeviceProfile("cpu", attn_flops=25e9, gemm_flops=90e9, tile_overhead_s=300e-6,
                         comm_latency_s=100e-6, comm_bus_bytes_s=2e9, min_tile_rows=16,
                         sublayer_tile_overhead_s=800e-6),
    "hopper": DeviceProfile("hopper", attn_flops=560e12, gemm_flops=680e12, tile_overhead_s=20e-6,
                            comm_latency_s=78e-6, comm_bus_bytes_s=310e9, min_tile_rows=256, row_align=128,
                            nvlink=True),
    "gpu": DeviceProfile("gpu", attn_flops=150e12, gemm_flops=250e12, tile_overhead_s=20e-6,
                         comm_latency_s=20e-6, comm_bus_bytes_s=100e9, min_tile_rows=256, row_align=128),
}


def profile_for(device: torch.device) -> DeviceProfile:
    return PROFILES[family_of(device).name]


@dataclass(frozen=True)
class Prediction:
    plan: TilePlan
    block_s: float      # predicted block time
    compute_s: float    # sum of compute
    comm_s: float       # sum of all-reduce time
    exposed_s: float    # block time not covered by compute
    streams: Optional[str] = None  # the tile streams mode it was measured with (measured plans only)


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

    def allreduce_s(self, rows: int, profile: DeviceProfile, link: Optional[LinkModel],
                    comm_model=None) -> float:
        """One tile's all-reduce: the comm model's (a GPU stand-in) if given, else the slower of the
        profile's and the simulated link's."""
        if self.world_size == 1:
            return 0.0
        nbytes = rows * self.hidden * self.elem_bytes
        if comm_model is not None:
            return comm_model.allreduce_seconds(nbytes, self.world_size)
        t = profile.allreduce_seconds(nbytes, self.world_size)
        if link is not None and link.active:
            t = max(t, link.allreduce_seconds(nbytes, self.world_size))
        return t


def _advance(t: float, work: float, busy: List[Tuple[float, float]], f: float) -> float:
    """When ``work`` seconds of compute started at ``t`` end, if compute runs at rate 1 - f inside the
    ``busy`` intervals (sorted, disjoint: a collective holding a share f of the SMs) and 1 elsewhere."""
    for s, e in busy:
        if work <= 0:
            break
        if e <= t:
            continue
        if s > t:  # free time before this interval
            step = min(work, s - t)
            t, work = t + step, work - step
            if work <= 0:
                break
        rate = 1.0 - f
        span_ = e - max(t, s)
        if rate * span_ >= work:
            return max(t, s) + work / rate
        t, work = e, work - rate * span_
    return t + max(work, 0.0)


@dataclass(frozen=True)
class LayerCost(BlockCost):
    """One decoder layer of a TP model: attention (q/k/v, attention, o_proj), then the MLP (gate/up, down).
    Each sublayer ends in an all-reduce of its rows; every sublayer of a prefill runs the same tiles."""

    kv_heads: int = 0
    intermediate: int = 0  # this rank's share

    def row_costs(self, mask: Mask, profile: DeviceProfile) -> torch.Tensor:
        proj = 2.0 * self.hidden * self.head_dim * (self.local_heads + 2 * self.kv_heads) \
            + 2.0 * 3 * self.hidden * self.intermediate
        return super().row_costs(mask, profile) + (proj / profile.gemm_flops)

    def sublayer_row_costs(self, mask: Mask, profile: DeviceProfile) -> Tuple[torch.Tensor, torch.Tensor]:
        """(attention sublayer, MLP sublayer) cost of each row."""
        qkvo = 2.0 * self.hidden * self.head_dim * (2 * self.local_heads + 2 * self.kv_heads)
        mlp = 2.0 * 3 * self.hidden * self.intermediate
        attn = super().row_costs(mask, profile) - 2.0 * self.local_heads * self.head_dim * self.hidden / profile.gemm_flops
        return attn + qkvo / profile.gemm_flops, torch.full_like(attn, mlp / profile.gemm_flops)


def simulate_stack(plan: TilePlan, cost: LayerCost, mask: Mask, layers: int, profile: DeviceProfile,
                   link: Optional[LinkModel] = None, comm_model=None) -> Prediction:
    """Predicted time of a whole prefill: ``layers`` x (attention, MLP) sublayers on one plan; tile i of a
    sublayer starts when the previous tile is computed and its own rows of the previous sublayer are
    all-reduced; the all-reduces queue on one link; the prefill ends with the last one."""
    costs = [torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(c, 0)])
             for c in cost.sublayer_row_costs(mask, profile)]
    comm = [cost.allreduce_s(r1 - r0, profile, link, comm_model) for r0, r1 in plan.ranges]
    t = link_free = total_compute = 0.0
    ready = [0.0] * plan.num_tiles  # when tile i's rows of the previous sublayer were reduced
    for _ in range(layers):
        for cum in costs:
            for i, (r0, r1) in enumerate(plan.ranges):
                c = float(cum[r1] - cum[r0]) + (profile.stack_tile_overhead_s if i > 0 else 0.0)
                t = max(t, ready[i]) + c
                total_compute += c
                link_free = max(t, link_free) + comm[i]
                ready[i] = link_free
    block = max(t, max(ready))
    return Prediction(plan, block, total_compute, sum(comm) * 2 * layers, block - total_compute)


def choose_stack_plan(cost: LayerCost, mask: Mask, layers: int, *, profile: DeviceProfile,
                      link: Optional[LinkModel] = None, options: TilePlanOptions = TilePlanOptions(),
                      comm_model=None) -> Prediction:
    """``tiles="auto"`` for a model's prefill: the cost-balanced plan (small last tile: the last all-reduce is
    the one left exposed) of the tile count ``simulate_stack`` predicts fastest; one tile unless it gains."""
    row_cost = cost.row_costs(mask, profile)
    single = simulate_stack(TilePlan.single(int(row_cost.numel())), cost, mask, layers, profile, link, comm_model)
    if cost.world_size == 1:
        return single
    best = single
    for plan in candidate_plans(row_cost, options, max(options.min_tile_rows, profile.min_tile_rows),
                                profile.row_align)[1:]:
        pred = simulate_stack(plan, cost, mask, layers, profile, link, comm_model)
        if pred.block_s < best.block_s:
            best = pred
    return single if best.block_s > single.block_s * (1.0 - options.min_gain) else best


def simulate(plan: TilePlan, row_cost: torch.Tensor, cost: BlockCost, profile: DeviceProfile,
             link: Optional[LinkModel], comm_model=None, compute_s: Optional[float] = None,
             sm_fraction: float = 0.0) -> Prediction:
    """Predicted timeline of the pipeline for ``plan``. ``compute_s``: a measured total compute time of this
    plan, spread over its tiles by modelled cost (replaces the model's compute and overhead).
    ``sm_fraction``: the share of SMs an all-reduce holds while it runs (slows the compute it overlaps)."""
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(row_cost, 0)])
    tiles = [float(cum[r1] - cum[r0]) + (profile.tile_overhead_s if i > 0 else 0.0)
             for i, (r0, r1) in enumerate(plan.ranges)]
    if compute_s is not None:
        scale = compute_s / sum(tiles)
        tiles = [t * scale for t in tiles]
    t_compute = t_comm = total_comm = 0.0
    busy: List[Tuple[float, float]] = []
    for (r0, r1), c in zip(plan.ranges, tiles):
        t_compute = _advance(t_compute, c, busy, sm_fraction)
        a = cost.allreduce_s(r1 - r0, profile, link, comm_model)
        total_comm += a
        start = max(t_compute, t_comm)
        t_comm = start + a
        if a > 0:
            busy.append((start, t_comm))
    block = max(t_compute, t_comm)
    return Prediction(plan, block, sum(tiles), total_comm, block - sum(tiles))


def refine(plan: TilePlan, predict, min_rows: int) -> Tuple[TilePlan, float]:
    """Local search over the cut points of ``plan`` (coordinate descent, halving steps); deterministic."""
    bounds = list(plan.bounds)
    best = predict(TilePlan(tuple(bounds)))
    rows = bounds[-1]
    step = max(min_rows, rows // 16)
    while step >= max(1, min_rows // 2):
        improved = False
        for j in range(1, len(bounds) - 1):
            for delta in (-step, step):
                c = bounds[j] + delta
                if c - bounds[j - 1] < min_rows or bounds[j + 1] - c < min_rows:
                    continue
                trial = bounds[:j] + [c] + bounds[j + 1:]
                t = predict(TilePlan(tuple(trial)))
                if t < best - 1e-12:
                    bounds, best, improved = trial, t, True
        if not improved:
            step //= 2
    return TilePlan(tuple(bounds)), best


def candidate_plans(row_cost: torch.Tensor, options: TilePlanOptions, min_tile_rows: int,
                    align: int = 1) -> List[TilePlan]:
    rows = int(row_cost.numel())
    most = max(1, min(options.max_tiles, rows // max(1, min_tile_rows)))
    return [cost_balanced_plan(row_cost, n, options.last_tile_share, align) for n in range(1, most + 1)]


@dataclass
class MeasuredPlans:
    """Plans measured on this GPU for one shape (``fastattn-dist tune``): compute alone, and where tune ran with
    comm (a TP group, or the stand-in), whole blocks with each comm path and stream mode."""

    plans: List[Tuple[Tuple[int, ...], float, str]] = field(default_factory=list)  # (bounds, seconds, streams)
    full: List[Tuple[Tuple[int, ...], str, str, float]] = field(default_factory=list)  # (bounds, comm, streams, s)


def choose_plan(cost: BlockCost, mask: Mask, *, profile: DeviceProfile, link: Optional[LinkModel] = None,
                options: TilePlanOptions = TilePlanOptions(), comm_model=None, sm_fraction: float = 0.0,
                measured: Optional[MeasuredPlans] = None) -> Prediction:
    """The plan ``tiles="auto"`` uses: the fastest predicted, or one tile if tiling gains < min_gain."""
    row_cost = cost.row_costs(mask, profile)
    rows = int(row_cost.numel())

    def sim(plan: TilePlan, compute_s: Optional[float] = None) -> Prediction:
        return simulate(plan, row_cost, cost, profile, link, comm_model, compute_s, sm_fraction)

    if measured is not None and measured.plans:
        preds = [replace(sim(TilePlan(tuple(b)), s), streams=mode) for b, s, mode in measured.plans]
        single = next((p for p in preds if p.plan.num_tiles == 1), None)
        best = min(preds, key=lambda p: p.block_s)
        if single is None or cost.world_size == 1:
            return single or best
        return single if best.block_s > single.block_s * (1.0 - options.min_gain) else best
    single = sim(TilePlan.single(rows))
    if cost.world_size == 1:
        return single
    min_rows = max(options.min_tile_rows, profile.min_tile_rows)
    best = single
    for plan in candidate_plans(row_cost, options, min_rows, profile.row_align)[1:]:
        plan, _ = refine(plan, lambda p: sim(p).block_s, min_rows)
        pred = sim(plan)
        if pred.block_s < best.block_s:
            best = pred
    if best.block_s > single.block_s * (1.0 - options.min_gain):
        return single
    return best


# A plan whose all-reduces take at least this share of its compute is comm-bound: its tiles then run one
# after another ("one"), so each tile's GEMM, and so its all-reduce, starts unobstructed; otherwise they
# overlap ("overlap"), so later tiles fill the SMs earlier ones leave idle (measured, docs/gpu_emulation.md).
COMM_BOUND = 0.8


def tile_streams_for(pred: Prediction) -> str:
    """How the tiles of a predicted plan should share a GPU (row_parallel.py's modes)."""
    if pred.streams is not None:
        return pred.streams
    if pred.plan.num_tiles == 1:
        return "one"
    return "one" if pred.comm_s >= COMM_BOUND * pred.compute_s else "overlap"


@dataclass(frozen=True)
class CommOption:
    """What the cost model needs of one comm path: its time model (None: the profile's) and SM share."""

    model: object = None
    sm_fraction: float = 0.0


def choose(cost: BlockCost, mask: Mask, tiles, *, profile: DeviceProfile, comms: Dict[str, CommOption],
           link: Optional[LinkModel] = None, options: TilePlanOptions = TilePlanOptions(),
           measured: Optional[MeasuredPlans] = None) -> Tuple[Prediction, str]:
    """The plan and the comm path for one call: ``tiles`` "auto" (the cost model), a fixed count or a plan; among
    several comm paths the one with the lowest predicted block time (the first one on a tie)."""
    if tiles == "auto" and measured is not None and cost.world_size > 1:
        timed = [(s, b, c, st) for b, c, st, s in measured.full if c in comms]
        if timed:  # whole blocks timed with these comm paths: the fastest, comm and SM contention included
            s, b, c, st = min(timed)
            return Prediction(TilePlan(tuple(b)), s, s, 0.0, 0.0, streams=st), c
    best = None
    for name, opt in comms.items():
        if tiles == "auto":
            pred = choose_plan(cost, mask, profile=profile, link=link, options=options, comm_model=opt.model,
                               sm_fraction=opt.sm_fraction, measured=measured)
        else:
            plan = tiles if isinstance(tiles, TilePlan) else fixed_plan(cost, mask, tiles, profile=profile,
                                                                        options=options)
            pred = simulate(plan, cost.row_costs(mask, profile), cost, profile, link, opt.model,
                            sm_fraction=opt.sm_fraction)
        if best is None or pred.block_s < best[0].block_s * (1 - 1e-9):
            best = (pred, name)
    return best


def fixed_plan(cost: BlockCost, mask: Mask, num_tiles: int, *, profile: DeviceProfile,
               options: TilePlanOptions = TilePlanOptions()) -> TilePlan:
    """The cost-balanced plan for a tile count the user fixed (at most one tile per row)."""
    return cost_balanced_plan(cost.row_costs(mask, profile), num_tiles, options.last_tile_share, profile.row_align)


def plans_to_time(cost: BlockCost, mask: Mask, profile: DeviceProfile, options: TilePlanOptions,
                  link: Optional[LinkModel] = None, comm_model=None, counts: Sequence[int] = (1, 2, 3, 4)
                  ) -> Dict[int, TilePlan]:
    """What ``tune`` measures for a shape: per tile count, the plan the model would pick with that count."""
    row_cost = cost.row_costs(mask, profile)
    min_rows = max(options.min_tile_rows, profile.min_tile_rows)
    out = {}

    def predict(plan: TilePlan) -> float:
        return simulate(plan, row_cost, cost, profile, link, comm_model).block_s

    for n in counts:
        if n * min_rows > row_cost.numel() and n > 1:
            continue
        plan = cost_balanced_plan(row_cost, n, options.last_tile_share, profile.row_align)
        out[n] = refine(plan, predict, min_rows)[0] if n > 1 and cost.world_size > 1 else plan
    return out
