"""The model's collectives all go through the comm interface, and an emulated rank holds what a real one holds."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import model_jobs by name

from fastattn_dist import spawn_ranks  # noqa: E402
from fastattn_dist.models import tiny_checkpoint  # noqa: E402
from model_jobs import counted_collectives, shard_state  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.mark.parametrize("tiles", [1, 3])
def test_every_collective_of_prefill_and_decode_goes_through_the_comm_interface(tiny, tiles):
    steps = 3
    for r in spawn_ranks(counted_collectives, 2, (tiny, tiles, steps), timeout_s=60):
        L, T = r["layers"], r["tiles"]
        assert T == tiles
        # prefill: one all-reduce per tile and sublayer, the embedding's, the LM head's gather
        assert r["prefill"] == {"start": 2 * L * T, "all_reduce": 1, "all_gather": 1}
        # decode: per step two all-reduces per layer, the embedding's, and the gather
        assert r["all"] == {"start": 2 * L * T, "all_reduce": 1 + steps * (2 * L + 1), "all_gather": 1 + steps}
        # torch.distributed saw exactly these, none beside the interface
        assert r["raw"] == {"all_reduce": r["all"]["start"] + r["all"]["all_reduce"],
                            "all_gather": r["all"]["all_gather"]}


def test_an_emulated_rank_holds_the_shard_of_rank_0_of_a_real_run(tiny):
    """The same checkpoint slices, and the same random weights, as rank 0 of a real TP=2 run."""
    from fastattn_dist.models.llama import LlamaForCausalLM
    from fastattn_dist.parallel.emulated_comm import LinkStandIn
    from fastattn_dist.parallel.link_models import LinkModel

    real = spawn_ranks(shard_state, 2, (tiny, 7), timeout_s=60)[0]
    emulated = LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32, comm=LinkStandIn(2, LinkModel()))
    rand = LlamaForCausalLM(emulated.config, dtype=torch.float32, comm=LinkStandIn(2, LinkModel()))
    rand.init_random_weights(7)
    for name, got in (("checkpoint", emulated.state_dict()), ("random", rand.state_dict())):
        want = real[name]
        assert set(got) == set(want)
        for k, t in got.items():
            assert torch.equal(t, want[k]), (name, k)
    assert emulated.shape.local_heads * 2 == emulated.config.num_attention_heads  # half of the heads: a shard


@pytest.mark.parametrize("world,tiles", [(1, 3), (2, 4)])
def test_the_wavefront_schedule_computes_what_the_one_stream_schedule_does(tiny, world, tiles):
    """Tiles issued by anti-diagonals (sublayer k of tile i beside sublayer k + 1 of tile i - 1) through two
    alternating output buffers, a padded batch whose tiles cut sequences: the same logits, bit for bit."""
    from model_jobs import schedules_agree

    for r in spawn_ranks(schedules_agree, world, (tiny, tiles), timeout_s=60):
        assert torch.equal(r["one"], r["wavefront"]) and torch.equal(r["one_cache"], r["wavefront_cache"])
    with pytest.raises(ValueError, match="prefill_schedule"):
        from fastattn_dist.models.llama import LlamaForCausalLM
        LlamaForCausalLM.from_pretrained(tiny, prefill_schedule="zigzag")


def test_a_tuned_plan_must_beat_one_tile_by_the_slice_margin():
    """The slice's times of 8b TP=2 at 32K on an H200 (4 tiles 3.4% ahead on the slice, 2% behind on the whole
    model) keep one tile; a clear win is kept."""
    from fastattn_dist.models.bench_model import pick_tuned

    assert pick_tuned({1: 179.0, 2: 174.16, 3: 173.77, 4: 172.92}) == 1
    assert pick_tuned({1: 38.95, 2: 35.39, 3: 31.12, 4: 30.57}) == 4
    assert pick_tuned({1: 7.41, 2: 7.51}) == 1


def test_tune_model_stores_the_fastest_plan_and_auto_takes_it(tiny, monkeypatch):
    """``tune --model``'s measurement (here on CPU, in process, with the simulated link as the stand-in): every
    plan timed, the fastest one stored under the shard's key; the model's tiles='auto' uses a stored plan."""
    from fastattn_dist.models import llama as llama_mod
    from fastattn_dist.models.bench_model import SLICE_MARGIN, BenchModelOptions, tune_model

    opts = BenchModelOptions(tiny, "tiny", torch.float32, repeats=1, warmup=0, layers=2, emulate_tp=2,
                             rows=[(1, 64)], tile_counts=[1, 2, 3])
    (key, entry), = tune_model(0, 1, opts).items()
    assert key.startswith("model|cpu|4B|b1|s64|") and "tp2" in key and "simulated link" in key
    times = {tuple(p["bounds"]): p["ms"] for p in entry["plans"]}
    assert len(times) == 3 and entry["layers"] == 2
    fastest = min(times, key=times.get)
    one = times[(0, 64)]
    assert tuple(entry["best"]) == (fastest if times[fastest] < one * (1 - SLICE_MARGIN) else (0, 64))
    model = llama_mod.LlamaForCausalLM.from_pretrained(tiny)
    monkeypatch.setattr(llama_mod, "lookup_model_plan", lambda device, k: (0, 10, 64) if k == model.tuned_key(1, 64)
                        else None)
    assert model.plan_for(1, 64, "auto").bounds == (0, 10, 64)
    assert model.plan_for(1, 65, "auto").bounds != (0, 10, 65)  # another shape: the cost model's
