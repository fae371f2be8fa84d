"""Real gloo ranks: tiled == sequential == float64 reference, for world sizes 1-4 and odd shapes."""
import pytest
import torch

from conftest import REL_TOL, rel_err
from fastattn_dist import KeyPadding, LinkModel, SlidingWindow, spawn_ranks
from fastattn_dist.reference_block import reference_block
from rank_jobs import block_grid, link_timing, make_input, make_weights

TILES = (1, 2, 3, 7, "auto")


def cases_for(world):
    """Shapes whose rows never divide evenly by the tile counts; GQA ratios 1..4; every mask."""
    heads, kv = {1: (4, 1), 2: (8, 2), 3: (12, 3), 4: (8, 4)}[world]
    slow = LinkModel(latency_us=200, gbps=0.5)
    base = dict(hidden=heads * 8, heads=heads, kv_heads=kv, tiles=TILES)
    return [
        ("causal_b2_s37", dict(base, batch=2, seq=37, mask="causal")),
        ("none_b1_s129_rope", dict(base, batch=1, seq=129, mask="none", rope=10000.0)),
        ("window5_b3_s19", dict(base, batch=3, seq=19, mask=SlidingWindow(5))),
        ("pad_b2_s23_link", dict(base, batch=2, seq=23, mask=KeyPadding([9, 23]), link=slow)),
        ("mha_b1_s1", dict(base, kv_heads=heads, batch=1, seq=1, mask="causal")),
        ("bf16_b1_s41", dict(base, batch=1, seq=41, mask="causal", dtype=torch.bfloat16, tiles=(1, 3))),
    ]


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"world{w}")
def grid(request):
    world = request.param
    cases = cases_for(world)
    results = spawn_ranks(block_grid, world, (cases,), timeout_s=90)
    return world, dict(cases), results


def test_tiled_equals_sequential_equals_reference(grid):
    world, cases, results = grid
    for name, c in cases.items():
        dtype = c.get("dtype", torch.float32)
        w = make_weights(c["hidden"], c["heads"], c["kv_heads"], dtype=dtype)
        x = make_input(c["batch"], c["seq"], c["hidden"], dtype=dtype)
        ref = reference_block(x, *w, c["heads"], c["kv_heads"], mask=c["mask"], rope_theta=c.get("rope"))
        seq_out = results[0][name][1][0]
        for tiles in c["tiles"]:
            out, bounds = results[0][name][tiles]
            assert bounds[-1] == c["batch"] * c["seq"]
            if isinstance(tiles, int):
                assert len(bounds) - 1 == min(tiles, c["batch"] * c["seq"]), (name, tiles, bounds)
            elif world == 1:  # auto never tiles where there is nothing to overlap
                assert bounds == (0, c["batch"] * c["seq"])
            err = rel_err(out, ref)
            assert err <= REL_TOL[dtype], f"world {world} {name} tiles={tiles}: error {err:.2e} vs fp64"
            # Tiling changes only where rows are cut, not the arithmetic of a row.
            assert rel_err(out, seq_out) <= REL_TOL[dtype] / 4, f"{name} tiles={tiles}: tiled vs sequential"
            for r in range(1, world):  # every rank holds the same all-reduced output
                other, other_bounds = results[r][name][tiles]
                assert other_bounds == bounds
                assert torch.equal(other, out), f"rank {r} differs from rank 0 ({name}, tiles={tiles})"


@pytest.mark.parametrize("world", [2, 3])
def test_link_model_makes_each_allreduce_take_its_modelled_time(world):
    """n transfers queued on one link: at least n * (latency + bus_bytes / bandwidth), and the data is right."""
    latency_us, gbps, nbytes, tiles = 20_000, 0.1, 400_000, 3
    res = spawn_ranks(link_timing, world, (latency_us, gbps, nbytes, tiles), timeout_s=60)
    per = LinkModel(latency_us, gbps).allreduce_seconds(nbytes, world)
    for elapsed, values in res:
        assert elapsed >= tiles * per * 0.999
        assert values == [float(world)] * tiles
