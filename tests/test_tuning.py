"""Tile plans and the cost model behind tiles="auto" (pure logic: no ranks)."""
import pytest
import torch

from fastattn_dist import Causal, LinkModel, NoMask, SlidingWindow, TilePlan
from fastattn_dist.tuning.cost_model import TilePlanOptions
from fastattn_dist.parallel.tile_plan import cost_balanced_plan, tile_segments
from fastattn_dist.tuning.cost_model import (PROFILES, BlockCost, DeviceProfile, LayerCost, choose_plan, choose_stack_plan,
                                  simulate, simulate_stack)

CPU = PROFILES["cpu"]


def cost(batch=1, seq=1024, world=2, hidden=1024, heads=8, dim=64):
    return BlockCost(batch, seq, hidden, heads, dim, world, 4)


@pytest.mark.parametrize("rows,n", [(1, 1), (1, 5), (7, 3), (37, 7), (100, 100), (1000, 13)])
def test_plan_covers_rows_with_non_empty_tiles(rows, n):
    plan = cost_balanced_plan(torch.rand(rows) + 0.1, n)
    assert plan.bounds[0] == 0 and plan.rows == rows and plan.num_tiles == min(n, rows)
    assert all(r1 > r0 for r0, r1 in plan.ranges)


def test_causal_plan_balances_cost_and_keeps_the_last_tile_small():
    c = cost(seq=4096)
    rc = c.row_costs(Causal(), CPU)
    plan = cost_balanced_plan(rc, 6, last_tile_share=0.5)
    sizes = [r1 - r0 for r0, r1 in plan.ranges]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 2 * sizes[-2]  # later rows cost more
    tile_cost = [float(rc[r0:r1].sum()) for r0, r1 in plan.ranges]
    for t in tile_cost[:-1]:
        assert t == pytest.approx(tile_cost[0], rel=0.02)
    assert tile_cost[-1] == pytest.approx(0.5 * tile_cost[0], rel=0.05)
    # Without a mask every row costs the same: equal tiles but the last.
    sizes = [r1 - r0 for r0, r1 in cost_balanced_plan(cost(seq=4096).row_costs(NoMask(), CPU), 5, 1.0).ranges]
    assert max(sizes) - min(sizes) <= 1


def test_bad_plans_are_rejected():
    for bounds in ((0,), (1, 5), (0, 3, 3), (0, 5, 2)):
        with pytest.raises(ValueError):
            TilePlan(bounds)


def test_segments_cover_rows_across_sequences():
    S = 7
    for r0, r1 in ((0, 21), (3, 17), (5, 6), (7, 14), (6, 8)):
        rows = []
        for b0, b1, s0, s1 in tile_segments(r0, r1, S):
            assert b1 == b0 + 1 or (s0 == 0 and s1 == S)
            rows += [b * S + s for b in range(b0, b1) for s in range(s0, s1)]
        assert rows == list(range(r0, r1))


def test_simulate_matches_hand_computed_pipeline():
    prof = DeviceProfile("toy", 1.0, 1.0, tile_overhead_s=0.0, comm_latency_s=0.0, comm_bus_bytes_s=1e30)
    c = BlockCost(1, 4, 1, 1, 1, 2, 1)
    row_cost = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    link = LinkModel(latency_us=0, gbps=1e-9)  # 1 byte per row, ring factor 1 at world 2: 1 s per row
    one = simulate(TilePlan.single(4), row_cost, c, prof, link)
    assert one.block_s == pytest.approx(8.0) and one.exposed_s == pytest.approx(4.0)
    two = simulate(TilePlan((0, 2, 4)), row_cost, c, prof, link)
    # compute 0-2, 2-4; comm 2-4, 4-6: block 6, exposed 2
    assert two.block_s == pytest.approx(6.0) and two.exposed_s == pytest.approx(2.0)


def test_auto_never_tiles_where_it_cannot_pay():
    assert choose_plan(cost(world=1), Causal(), profile=CPU).plan.num_tiles == 1
    assert choose_plan(cost(seq=8), Causal(), profile=CPU).plan.num_tiles == 1  # less than two min tiles
    # Comm negligible against compute: tiling only adds overhead.
    fast_link = DeviceProfile("fast", 25e9, 90e9, 300e-6, 0.0, 1e15)
    assert choose_plan(cost(seq=512), Causal(), profile=fast_link).plan.num_tiles == 1


def test_auto_tiles_when_comm_is_comparable_to_compute():
    pred = choose_plan(cost(seq=1024), Causal(), profile=CPU, link=LinkModel(50, 0.08))
    single = simulate(TilePlan.single(1024), cost(seq=1024).row_costs(Causal(), CPU), cost(seq=1024), CPU,
                      LinkModel(50, 0.08))
    assert pred.plan.num_tiles > 1 and pred.block_s < 0.9 * single.block_s
    assert pred.exposed_s < 0.5 * single.exposed_s


def test_auto_respects_options():
    opts = TilePlanOptions(max_tiles=3)
    pred = choose_plan(cost(seq=2048), SlidingWindow(256), profile=CPU, link=LinkModel(50, 0.05), options=opts)
    assert 1 < pred.plan.num_tiles <= 3
    with pytest.raises(ValueError):
        TilePlanOptions(last_tile_share=0)


@pytest.mark.parametrize("r0,r1,world", [(0, 10, 2), (5, 6, 4), (3, 40, 3), (0, 2, 4)])
def test_copy_engine_chunks_partition_the_tile(r0, r1, world):
    from fastattn_dist.parallel.copy_engine import chunk_bounds

    chunks = chunk_bounds(r0, r1, world)
    assert len(chunks) == world and chunks[0][0] == r0 and chunks[-1][1] == r1
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    sizes = [c1 - c0 for c0, c1 in chunks]
    assert max(sizes) - min(sizes) <= 1


def test_stream_mode_follows_whether_comm_or_compute_bounds_the_plan():
    from fastattn_dist.tuning.cost_model import Prediction, tile_streams_for

    plan = TilePlan((0, 10, 20))
    assert tile_streams_for(Prediction(plan, 2.0, compute_s=1.0, comm_s=0.9, exposed_s=1.0)) == "one"
    assert tile_streams_for(Prediction(plan, 2.0, compute_s=1.0, comm_s=0.5, exposed_s=1.0)) == "overlap"
    assert tile_streams_for(Prediction(TilePlan.single(20), 2.0, 1.0, 0.1, 1.0)) == "one"
    assert tile_streams_for(Prediction(plan, 2.0, 1.0, 0.9, 1.0, streams="lead")) == "lead"  # as measured


def test_measured_plans_replace_the_model_and_a_taxed_plan_is_not_chosen():
    """With measured compute, auto simulates only the plans timed on the GPU: a plan whose measured tax exceeds
    the comm it hides loses to one tile; a cheap one wins."""
    from fastattn_dist.tuning.cost_model import MeasuredPlans, choose_plan

    c = cost(seq=1024, world=2)
    link = LinkModel(50, 0.08)
    two = cost_balanced_plan(c.row_costs(Causal(), CPU), 2).bounds
    t1 = simulate(TilePlan.single(1024), c.row_costs(Causal(), CPU), c, CPU, link).compute_s
    cheap = MeasuredPlans([((0, 1024), t1, "one"), (two, t1 * 1.01, "overlap")])
    pred = choose_plan(c, Causal(), profile=CPU, link=link, measured=cheap)
    assert pred.plan.bounds == two and pred.streams == "overlap"
    taxed = MeasuredPlans([((0, 1024), t1, "one"), (two, t1 * 3.0, "overlap")])
    assert choose_plan(c, Causal(), profile=CPU, link=link, measured=taxed).plan.num_tiles == 1


def test_tuned_profile_round_trip(tmp_path, monkeypatch):
    from fastattn_dist.tuning import measured as tune

    path = tmp_path / "sub" / "tuned.json"
    monkeypatch.setenv(tune.ENV, str(path))
    assert tune.profile_path() == str(path)
    tune.store(str(path), {"k1": {"plans": [{"tiles": 1, "bounds": [0, 8], "streams": "one", "compute_ms": 2.0}]}})
    tune.store(str(path), {"k2": {"plans": []}})  # merged, not replaced
    assert set(tune._load(str(path))) == {"k1", "k2"}
    # on CPU the built-in profile always decides (measured plans are per GPU model)
    assert tune.lookup(torch.device("cpu"), cost(), Causal()) is None
    (tmp_path / "a_file").write_text("x")  # a file where a folder should be: the write fails, in one line
    with pytest.raises(ValueError, match="could not write the tuned profile"):
        tune.store(str(tmp_path / "a_file" / "t.json"), {"k": {}})


# -- a model's prefill: every sublayer on one plan (simulate_stack) ----------------------------------------------
def layer_cost(seq=1024, world=2):
    return LayerCost(1, seq, 128, 4, 16, world, 4, kv_heads=2, intermediate=172)


def test_stack_with_one_tile_exposes_every_sublayers_all_reduce():
    lc, link, layers = layer_cost(), LinkModel(50, 0.04), 3
    one = simulate_stack(TilePlan.single(1024), lc, Causal(), layers, CPU, link)
    ar = lc.allreduce_s(1024, CPU, link)
    assert one.comm_s == pytest.approx(2 * layers * ar)
    assert one.block_s == pytest.approx(one.compute_s + 2 * layers * ar)


def test_stack_tiles_leave_about_one_tiles_all_reduce_exposed_not_one_per_sublayer():
    lc, layers = layer_cost(), 4
    free = DeviceProfile("no overhead", 25e9, 90e9, tile_overhead_s=0.0, comm_latency_s=0.0, comm_bus_bytes_s=1e30)
    for_compute = simulate_stack(TilePlan.single(1024), lc, Causal(), layers, free, None).compute_s / (2 * layers)
    link = LinkModel(0.0, 1024 * 128 * 4 / (0.5 * for_compute) / 1e9)  # a sublayer's comm = half its compute
    one = simulate_stack(TilePlan.single(1024), lc, Causal(), layers, free, link)
    tiled = simulate_stack(TilePlan((0, 400, 650, 850, 1024)), lc, Causal(), layers, free, link)
    sublayer_ar = lc.allreduce_s(1024, free, link)
    assert one.exposed_s == pytest.approx(2 * layers * sublayer_ar)
    assert tiled.exposed_s < sublayer_ar  # less than one sublayer's all-reduce in all, not 2 x layers of them
    assert tiled.block_s < one.block_s


def test_stack_charges_the_sublayer_tile_overhead_per_tile_and_sublayer():
    toy = DeviceProfile("toy", 1e9, 1e9, tile_overhead_s=1.0, comm_latency_s=0.0, comm_bus_bytes_s=1e30,
                        sublayer_tile_overhead_s=0.25)
    lc, layers = layer_cost(), 3
    one = simulate_stack(TilePlan.single(1024), lc, Causal(), layers, toy)
    four = simulate_stack(TilePlan((0, 300, 600, 900, 1024)), lc, Causal(), layers, toy)
    assert four.compute_s - one.compute_s == pytest.approx(3 * 2 * layers * 0.25)
    assert DeviceProfile("p", 1, 1, 0.5, 0, 1).stack_tile_overhead_s == 0.5  # default: the block's overhead


def test_stack_plan_tiles_only_where_it_pays():
    assert choose_stack_plan(layer_cost(world=1), Causal(), 4, profile=CPU).plan.num_tiles == 1
    assert choose_stack_plan(layer_cost(), Causal(), 4, profile=CPU, link=None).plan.num_tiles == 1  # fast gloo
    heavy = choose_stack_plan(layer_cost(), Causal(), 4, profile=CPU, link=LinkModel(50, 0.04))
    assert heavy.plan.num_tiles > 1
    one = simulate_stack(TilePlan.single(1024), layer_cost(), Causal(), 4, CPU, LinkModel(50, 0.04))
    assert heavy.block_s < 0.9 * one.block_s


def test_cuts_fall_on_the_kernels_row_blocks_when_asked():
    from fastattn_dist.parallel.tile_plan import cost_balanced_plan

    rc = torch.arange(1, 8193, dtype=torch.float64)  # causal: later rows cost more
    plain, aligned = cost_balanced_plan(rc, 3), cost_balanced_plan(rc, 3, align=128)
    assert any(b % 128 for b in plain.bounds[1:-1]) and all(b % 128 == 0 for b in aligned.bounds[1:-1])
    assert aligned.rows == 8192 and aligned.num_tiles == 3
    assert all(abs(a - b) <= 64 for a, b in zip(plain.bounds, aligned.bounds))  # the nearest block edge


def test_auto_takes_the_fastest_whole_block_tune_measured_with_comm():
    """Where tune timed whole blocks with the comm paths (SM contention and latency included), auto takes the
    fastest of them, whatever the model predicts; comm paths the block does not have are not candidates."""
    from fastattn_dist.tuning.cost_model import PROFILES, BlockCost, CommOption, MeasuredPlans, choose

    cost = BlockCost(1, 8192, 4096, 16, 128, 2, 2)
    full = [((0, 8192), "nccl", "one", 1.00e-3), ((0, 4096, 8192), "copy_engine", "overlap", 0.97e-3),
            ((0, 2816, 5632, 8192), "nccl", "one", 0.93e-3), ((0, 4096, 8192), "nvls", "one", 0.5e-3)]
    comms = {"nccl": CommOption(None), "copy_engine": CommOption(None)}
    pred, name = choose(cost, Causal(), "auto", profile=PROFILES["hopper"], comms=comms, measured=MeasuredPlans([], full))
    assert (pred.plan.bounds, name, pred.streams) == ((0, 2816, 5632, 8192), "nccl", "one")
    fixed, _ = choose(cost, Causal(), 2, profile=PROFILES["hopper"], comms=comms, measured=MeasuredPlans([], full))
    assert fixed.plan.num_tiles == 2  # a fixed tile count is the user's
