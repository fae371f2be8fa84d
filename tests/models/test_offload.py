"""The KV cache split between two tiers, on CPU: the "device" tier and the "host" tier are both CPU tensors and
the host tier is attended by the worker thread. Prefill (chunked) and decode equal the one-tier cache within
fp32 tolerance: the tier boundary inside a tile and inside a key block, padded batches, GQA, sliding windows,
TP=2. Bad offload requests fail before any large allocation."""
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))

from fastattn_dist import spawn_ranks  # noqa: E402
from fastattn_dist.models.kv_offload import OffloadPlan  # noqa: E402
from model_jobs import offload_outputs  # noqa: E402
from test_llama import PROMPTS, make_checkpoint  # noqa: E402

TOL = 1e-4
STEPS = 8


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    return {name: make_checkpoint(root, name)[1] for name in ("llama_gqa", "mistral_window")}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name,world,gpu_tokens,chunk,tiles,share", [
    ("llama_gqa", 1, 13, 8, 3, 0.5),     # the boundary inside the second chunk, inside a tile and a key block
    ("llama_gqa", 2, 5, 6, 2, 0.37),     # TP=2; most of every prompt on the host tier, split decode
    ("llama_gqa", 2, 5, 6, 2, 0.0),      # TP=2, the host tier all streamed
    ("llama_gqa", 1, 19, 64, 1, None),   # the boundary at the longer prompt's end: decode spills to the host
    ("mistral_window", 1, 9, 5, 2, 0.6),  # sliding window of 7 across the boundary, prefill and decode
])
def test_two_tiers_equal_one(ckpts, name, world, gpu_tokens, chunk, tiles, share):
    """Logits of the chunked prefill and 8 decode steps (the host tier's decode split between the CPU and the
    stream at ``share``, None: the plan's, all on the CPU here) equal the one-tier cache's."""
    S = max(len(p) for p in PROMPTS)
    padded = [p + [0] * (S - len(p)) for p in PROMPTS]
    lengths = [len(p) for p in PROMPTS]
    one = spawn_ranks(offload_outputs, world, (ckpts[name], padded, lengths, STEPS, "off", None, 1), timeout_s=120)[0]
    two = spawn_ranks(offload_outputs, world, (ckpts[name], padded, lengths, STEPS, gpu_tokens, chunk, tiles, share),
                      timeout_s=120)[0]
    assert one["split"] is None and two["split"] == (gpu_tokens, S + STEPS + 1 - gpu_tokens)
    for step in range(STEPS + 1):
        err = rel(two["logits"][step], one["logits"][step])
        assert err < TOL, f"{name} step {step}: two tiers differ from one by {err:.2e}"


def test_offload_requests_that_cannot_fit_fail_before_allocating():
    from fastattn_dist.models.llama import LlamaForCausalLM
    from fastattn_dist.models.tiny import tiny_checkpoint

    with pytest.raises(ValueError, match="host budget"):
        OffloadPlan.decide(100, max_seq_len=10_000_000, batch=1, bytes_per_token=1 << 20, device=torch.device("cpu"),
                           host_budget_bytes=1 << 30, measure=False)
    with pytest.raises(ValueError, match="GPU"):  # auto offload on a CPU-only model
        LlamaForCausalLM.from_pretrained(tiny_checkpoint(), kv_offload="auto")
    for bad in (0, -5, "gpu", 2.5, True):
        with pytest.raises(ValueError):
            LlamaForCausalLM.from_pretrained(tiny_checkpoint(), kv_offload=bad)
    m = LlamaForCausalLM.from_pretrained(tiny_checkpoint(), kv_offload=4, host_budget_gb=1e-6)
    with pytest.raises(ValueError, match="host budget"):  # checked before the cache is allocated
        m.reset_cache(1, 1024)
    assert m.cache is None
    plan = OffloadPlan.decide(64, max_seq_len=256, batch=2, bytes_per_token=1024, device=torch.device("cpu"),
                              host_budget_bytes=1 << 30, measure=False)
    assert plan.offloaded and plan.gpu_tokens == 64 and "192 on the host" in plan.describe()


def test_default_host_budget_is_shared_by_the_ranks_of_a_node(monkeypatch):
    from fastattn_dist.models import offload_plan

    monkeypatch.setattr(offload_plan, "host_memory_bytes", lambda: 10 << 30)  # 8 GiB budget for the node
    need = dict(max_seq_len=4096, batch=1, bytes_per_token=1 << 20, device=torch.device("cpu"), measure=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert OffloadPlan.decide(1, **need).offloaded  # 4 GiB on the host: fits 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="host budget of 2.0 GiB"):  # a quarter of it per rank
        OffloadPlan.decide(1, **need)


def test_rates_are_measured_once_per_device(monkeypatch):
    from fastattn_dist.models import offload_plan

    calls = []
    monkeypatch.setattr(offload_plan, "_RATES", {})
    rates = offload_plan.HostRates(1.0, 2.0, 0.5, 1.5)
    monkeypatch.setattr(offload_plan, "_measure_rates", lambda device, mb=None: calls.append(device) or rates)
    assert offload_plan.measure_rates(torch.device("cpu")) is rates
    assert offload_plan.measure_rates(torch.device("cpu")) is rates
    assert len(calls) == 1
