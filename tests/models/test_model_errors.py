"""Bad use of the model's API on 2 gloo ranks: every rank raises a clear error by itself, before any collective
(so no rank waits on another: spawn_ranks sees an error from each rank, within its timeout)."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fastattn_dist import RankFailedError, spawn_ranks  # noqa: E402
from fastattn_dist.models import tiny_checkpoint  # noqa: E402
from model_jobs import bad_model_call  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.mark.parametrize("case, world, message", [
    ("missing checkpoint", 2, "checkpoint"),
    ("ids out of range", 2, "vocabulary"),
    ("empty input", 2, "empty"),
    ("empty prompt", 2, "empty"),
    ("prompt longer than the context", 2, "exceeds"),
    ("prompt longer than the cache", 2, "cache|max_seq_len"),
    ("float ids", 2, "int64"),
    ("heads not divisible by the world size", 3, "divisible|divide"),
])
def test_bad_model_use_fails_on_every_rank(tiny, case, world, message):
    with pytest.raises(RankFailedError) as info:
        spawn_ranks(bad_model_call, world, (tiny, case), timeout_s=60)
    errors = info.value.errors
    assert sorted(errors) == list(range(world)), errors  # each rank raised: nobody waited on a collective
    for r, (summary, _) in errors.items():
        assert summary.startswith(("ValueError", "FileNotFoundError")) and re.search(message, summary), (r, summary)


def test_a_decode_step_that_cannot_be_captured_is_refused_with_cuda_graph_true(tiny):
    import torch
    from fastattn_dist import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(tiny)
    m.reset_cache(1, 32)
    assert not m.decode_step_capturable  # a CPU model: nothing to capture
    with pytest.raises(ValueError, match="cannot be captured"):
        m.generate([[1, 2, 3]], 2, cuda_graph=True)
    assert len(m.generate([[1, 2, 3]], 2, stop_tokens=[])[0]) == 2  # the default picks eager here
    assert torch.equal(m.cache.lengths, torch.tensor([4]))


def test_forward_scratch_is_one_layer_shared_and_reused(tiny):
    import torch
    from fastattn_dist import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(tiny)
    a = m._scratch_kv(2, 16)
    assert all(k is a.k[0] for k in a.k) and all(v is a.v[0] for v in a.v) and len(a.k) == len(m.layers)
    assert m._scratch_kv(2, 16) is a and m._scratch_kv(2, 17) is not a
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    m.reset_cache(2, 16)
    with torch.no_grad():  # a cache-less forward equals a prefill into a real per-layer cache
        assert torch.allclose(m(ids, last_only=True), m.prefill(ids), rtol=1e-5, atol=1e-5)


def test_the_copy_engine_path_runs_the_model_where_it_can_and_falls_back_where_not(tiny):
    """The model takes comm="copy_engine" (its sublayers alternate between two symmetric buffers); without GPUs
    the path is the process group's own all-reduce."""
    import torch
    from fastattn_dist import LlamaForCausalLM
    from fastattn_dist.parallel.comm import ProcessGroupAllReduce

    m = LlamaForCausalLM.from_pretrained(tiny, comm="copy_engine")
    assert isinstance(m.comm, ProcessGroupAllReduce)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(m(ids, tiles=2), LlamaForCausalLM.from_pretrained(tiny)(ids, tiles=2))
    with pytest.raises(ValueError, match="comm must be one of"):
        LlamaForCausalLM.from_pretrained(tiny, comm="nvshmem")


def test_a_model_without_weights_refuses_to_compute(tiny):
    import torch
    from fastattn_dist import LlamaForCausalLM
    from fastattn_dist.models.checkpoint import Checkpoint

    m = LlamaForCausalLM(Checkpoint(tiny).config)
    ids = torch.tensor([[1, 2, 3]])
    for call in (lambda: m(ids), lambda: m.generate([[1, 2, 3]], 2)):
        with pytest.raises(ValueError, match="no weights yet"):
            call()
    m.init_random_weights(seed=3)
    assert torch.isfinite(m(ids)).all()
