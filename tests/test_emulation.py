"""One-GPU TP emulation, the parts that run on CPU: an emulated rank's output, the stand-in's timing model,
and the cost model's choice of plan and comm path (the GPU side is tests/gpu/test_emulation_gpu.py)."""
import math

import pytest
import torch

from conftest import REL_TOL, rel_err
from fastattn_dist import Causal, TPAttention, TilePlan
from fastattn_dist.parallel.comm import NoComm
from fastattn_dist.parallel.link_models import NVLINK_FITS as MEASURED_FITS, GpuLinkModel
from fastattn_dist.reference_block import reference_block
from fastattn_dist.tuning.cost_model import PROFILES, BlockCost, CommOption, choose, simulate
from rank_jobs import make_input, make_weights


@pytest.mark.parametrize("tp,heads,kv", [(2, 8, 2), (4, 8, 4), (4, 12, 4)])
def test_emulated_rank_is_rank_0_of_the_group(tp, heads, kv):
    """With comm off, an emulated rank returns exactly its own partial sum: rank 0's heads through rank 0's
    columns of o_proj, as the float64 reference computes it from the sliced weights."""
    hidden = heads * 8
    wq, wk, wv, wo = make_weights(hidden, heads, kv)
    blk = TPAttention(hidden, heads, kv, comm=NoComm(tp, 0), rope_theta=1e4)
    assert blk.shape.local_heads == heads // tp and blk.world_size == tp and blk.rank == 0
    blk.load_full_weights(wq, wk, wv, wo)
    x = make_input(2, 23, hidden)
    D, hl, kvl = 8, heads // tp, kv // tp
    ref = reference_block(x, wq[: hl * D], wk[: kvl * D], wv[: kvl * D], wo[:, : hl * D], hl, kvl, rope_theta=1e4)
    for tiles in (1, 3, TilePlan((0, 5, 30, 46))):
        assert rel_err(blk(x, tiles=tiles), ref) < REL_TOL[torch.float32], tiles


def test_standin_time_follows_the_ring_formula():
    m = GpuLinkModel(latency_us=50.0, bus_gbps=200.0)
    nbytes = 64 << 20
    for n in (2, 3, 4, 8):
        want = 50e-6 + 2 * (n - 1) / n * nbytes / 200e9
        assert m.allreduce_seconds(nbytes, n) == pytest.approx(want, rel=1e-12)
    assert m.allreduce_seconds(nbytes, 1) == 0.0 and m.allreduce_seconds(0, 4) == 0.0
    # NCCL squeezed onto fewer CTAs than the full-bandwidth count moves proportionally less per second
    few = GpuLinkModel(latency_us=50.0, bus_gbps=200.0, ctas=4)
    assert few.allreduce_seconds(nbytes, 2) == pytest.approx(50e-6 + nbytes / 50e9, rel=1e-12)
    ce = GpuLinkModel(latency_us=50.0, bus_gbps=200.0, ctas=4, path="copy_engine")
    assert ce.allreduce_seconds(nbytes, 2) == pytest.approx(m.allreduce_seconds(nbytes, 2))


def test_standin_defaults_are_the_measured_fits():
    for n, (lat, bw) in ((2, MEASURED_FITS[2]), (4, MEASURED_FITS[4]), (8, MEASURED_FITS[4])):
        m = GpuLinkModel.for_world_size(n)
        assert (m.latency_us, m.bus_gbps) == (lat, bw)
    # the fits reproduce the NCCL times they came from (H200 NVLink, [S, hidden] bf16) within 8%
    for n, rows, hidden, ms in ((2, 8192, 4096, 0.281), (2, 32768, 8192, 1.80), (4, 8192, 8192, 0.712),
                                (4, 32768, 4096, 1.34)):
        got = GpuLinkModel.for_world_size(n).allreduce_seconds(rows * hidden * 2, n) * 1e3
        assert got == pytest.approx(ms, rel=0.08), (n, rows, hidden)
    with pytest.raises(ValueError):
        GpuLinkModel.for_world_size(1)
    for bad in (dict(latency_us=-1.0, bus_gbps=1.0), dict(latency_us=1.0, bus_gbps=0.0),
                dict(latency_us=1.0, bus_gbps=1.0, path="nvls"), dict(latency_us=1.0, bus_gbps=1.0, ctas=0),
                dict(latency_us=1.0, bus_gbps=1.0, threads=100), dict(latency_us=math.nan, bus_gbps=1.0)):
        with pytest.raises(ValueError):
            GpuLinkModel(**bad)


def _cost(world=4, seq=8192, hidden=8192, heads=64):
    return BlockCost(1, seq, hidden, heads // world, 128, world, 2)


def test_comm_bound_blocks_get_a_small_first_tile():
    """When the all-reduces are the critical path, the planner starts them early: tile 0 is the smallest."""
    cost = _cost(world=4, seq=8192, hidden=4096, heads=32)
    model = GpuLinkModel.for_world_size(4)
    pred, name = choose(cost, Causal(), "auto", profile=PROFILES["hopper"], comms={"nccl": CommOption(model)})
    sizes = [r1 - r0 for r0, r1 in pred.plan.ranges]
    row_cost = cost.row_costs(Causal(), PROFILES["hopper"])
    one = simulate(TilePlan.single(8192), row_cost, cost, PROFILES["hopper"], None, model)
    assert pred.plan.num_tiles > 1 and pred.block_s < one.block_s
    first_cost = float(row_cost[: sizes[0]].sum())
    assert first_cost < max(float(row_cost[r0:r1].sum()) for r0, r1 in pred.plan.ranges[1:])


def test_sm_share_makes_overlapped_compute_slower_and_steers_the_comm_choice():
    cost = _cost()
    prof = PROFILES["hopper"]
    row_cost = cost.row_costs(Causal(), prof)
    plan = TilePlan((0, 4096, 6144, 8192))
    model = GpuLinkModel.for_world_size(4)
    free = simulate(plan, row_cost, cost, prof, None, model, sm_fraction=0.0)
    held = simulate(plan, row_cost, cost, prof, None, model, sm_fraction=0.25)
    assert held.block_s > free.block_s and held.compute_s == pytest.approx(free.compute_s)
    # a collective that holds SMs loses to one that does not, at equal comm time
    pred, name = choose(cost, Causal(), "auto", profile=prof,
                        comms={"sm": CommOption(model, 0.25), "ce": CommOption(model, 0.0)})
    assert name == "ce"
    # one tile: nothing overlaps, so the SM share costs nothing
    one = TilePlan.single(8192)
    assert simulate(one, row_cost, cost, prof, None, model, sm_fraction=0.5).block_s == pytest.approx(
        simulate(one, row_cost, cost, prof, None, model).block_s)


def test_small_messages_take_the_small_message_latency():
    """Decode's all-reduces (8-64 KB) are latency: the small-message figure below 256 KiB, the measured fit from
    16 MB, interpolated between; the time grows with the size and has no jump at either knee."""
    from fastattn_dist.parallel.link_models import FIT_MIN_BYTES, SMALL_LATENCY_US, SMALL_MAX_BYTES

    for n in (2, 4, 8):
        m = GpuLinkModel.for_world_size(n)
        t = m.allreduce_seconds(16 << 10, n)
        assert t == pytest.approx(SMALL_LATENCY_US[n] * 1e-6 + 2 * (n - 1) / n * (16 << 10) / (m.bus_gbps * 1e9))
        sizes = [1 << k for k in range(10, 30)]
        times = [m.allreduce_seconds(b, n) for b in sizes]
        assert times == sorted(times)
        for knee in (SMALL_MAX_BYTES, FIT_MIN_BYTES):
            assert m.allreduce_seconds(knee + 1, n) == pytest.approx(m.allreduce_seconds(knee, n), rel=1e-3)
    assert GpuLinkModel.for_world_size(4, small_latency_us=5.0).allreduce_seconds(1024, 4) < 6e-6  # an override
