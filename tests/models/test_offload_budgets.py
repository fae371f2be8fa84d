"""Sizes, budgets and the longest context, checked against arithmetic alone (nothing large is allocated): the
weights the model will allocate, ``--context max`` refusing nothing it could hold and allocating nothing it cannot,
the 95% bound for Llama-2-7B and Llama-3-8B shapes on an H200's memory, budgets that cannot hold the weights or
the context refused with the sizes named, and the prefill chunk the cost model picks."""
import pytest
import torch

from fastattn_dist.models import offload_plan as op
from fastattn_dist.models import tiny_checkpoint
from fastattn_dist.models.config import LlamaConfig
from fastattn_dist.models.llama import LlamaForCausalLM, model_shape
from fastattn_dist.models.offload_plan import GIB, CacheSizing, OffloadPlan, longest_context
from fastattn_dist.models.presets import preset_config
from fastattn_dist.parallel.comm import NoComm
from fastattn_dist.tuning.cost_model import PROFILES

GPU = torch.device("cpu")   # the device the plan is made for; its memory is given as free_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


def config(**kw):
    d = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=64,
             intermediate_size=80, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=256)
    d.update(kw)
    return LlamaConfig.from_dict(d)


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True},
                                {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                 "tie_word_embeddings": True}])
@pytest.mark.parametrize("world", [1, 2])
def test_weight_bytes_are_what_the_model_allocates(kw, world):
    cfg = config(**kw)
    for rank in range(world):
        m = LlamaForCausalLM(cfg, dtype=torch.float32, comm=NoComm(world, rank))
        have = sum(p.numel() * p.element_size() for p in m.parameters())
        assert op.weight_bytes(cfg, model_shape(cfg, world, rank), 4) == have, (kw, world, rank)


def h200_sizing(name):
    cfg = preset_config(name)
    return cfg, CacheSizing.of(cfg, model_shape(cfg, 1, 0), 2)


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(op, "profile_for", lambda device: PROFILES["hopper"])


@pytest.mark.parametrize("name", ["7b-mha", "8b", "8b-262k"])
@pytest.mark.parametrize("mode", ["auto", 32768])
def test_context_max_is_exactly_what_decide_accepts(hopper, name, mode):
    """The issue's machine: an H200 with 125.8 GiB free after the weights, a 98.7 GiB host budget."""
    cfg, sizing = h200_sizing(name)
    free, host = int(125.8 * GIB), int(98.7 * GIB)
    kw = dict(batch=1, sizing=sizing, device=GPU, free_bytes=free, host_budget_bytes=host, measure=False)
    cap = longest_context(mode, batch=1, sizing=sizing, device=GPU, free_bytes=free, host_budget_bytes=host,
                          limit=cfg.max_position_embeddings, pcie_gbps=54.0)
    if cap.tokens < cfg.max_position_embeddings:
        with pytest.raises(ValueError, match="host budget"):   # one token more: refused before allocating
            OffloadPlan.decide(mode, max_seq_len=cap.tokens + 1, prefill_chunk=cap.prefill_chunk, **kw)
    plan = OffloadPlan.decide(mode, max_seq_len=cap.tokens, prefill_chunk=cap.prefill_chunk, **kw)
    if cap.tokens == cfg.max_position_embeddings:  # 8b: its whole context fits, limited by the model, not memory
        return
    assert plan.offloaded and plan.host_tokens * sizing.bytes_per_token <= host
    assert plan.gpu_tokens * sizing.bytes_per_token + sizing.reserve_bytes(plan.prefill_chunk, 1, True) <= free
    if mode == "auto":
        bound = (free - sizing.activation_bytes(cap.prefill_chunk) + host) // sizing.bytes_per_token
        assert cap.bound_tokens == bound
        want = min(cfg.max_position_embeddings, 0.95 * bound)
        assert cap.tokens >= want, f"{name}: {cap.tokens} < 95% of {bound}"


def test_7b_mha_on_the_issues_h200_reaches_about_450k(hopper):
    _, sizing = h200_sizing("7b-mha")
    cap = longest_context("auto", batch=1, sizing=sizing, device=GPU, free_bytes=int(125.8 * GIB),
                          host_budget_bytes=int(98.7 * GIB), pcie_gbps=54.0)
    assert 440_000 < cap.tokens < 460_000 and cap.share_of_bound > 0.97, cap


def test_one_tier_capacity_is_exact():
    _, sizing = h200_sizing("7b-mha")
    free = int(125.8 * GIB)
    cap = longest_context("off", batch=1, sizing=sizing, device=GPU, free_bytes=free)
    kw = dict(batch=1, sizing=sizing, device=GPU, free_bytes=free, measure=False)
    assert not OffloadPlan.decide("off", max_seq_len=cap.tokens, **kw).offloaded
    with pytest.raises(ValueError, match="needs .* GiB"):
        OffloadPlan.decide("off", max_seq_len=cap.tokens + 1, **kw)
    assert cap.prefill_chunk > 0  # so long a cache leaves no room for a whole-prompt prefill: chunked


def test_a_host_tier_fits_its_budget_to_the_block():
    """Small tiers too: the host capacity is the largest whose padded blocks fit, whatever the block size."""
    per_token = 1000
    for budget in range(1000, 200_000, 7919):
        h = op.host_capacity(budget, per_token)
        assert op.padded_host_tokens(h) * per_token <= budget
        assert op.padded_host_tokens(h + 1) * per_token > budget


def test_budgets_that_cannot_hold_the_weights_or_the_context_name_the_sizes():
    _, sizing = h200_sizing("7b-mha")
    with pytest.raises(ValueError, match=r"GPU budget of 12.0 GiB cannot hold this rank's weights \(12.6 GiB\)"):
        op.check_gpu_budget(sizing, 1, 12 * GIB)
    with pytest.raises(ValueError, match=r"needs 64.0 GiB.*more than the GPU budget of 24.0 GiB"):
        op.check_request("off", 131072, 1, sizing, None, 24 * GIB)
    with pytest.raises(ValueError, match=r"host tier needs .* GiB .* over the host budget of 10.0 GiB"):
        op.check_request("auto", 131072, 1, sizing, 10 * GIB, 24 * GIB)
    op.check_request("auto", 131072, 1, sizing, 80 * GIB, 24 * GIB)  # fits: no error
    op.check_request("auto", 131072, 1, sizing, 1 * GIB, None)       # the GPU's free memory decides, later


def test_gpu_budget_caps_the_device_tier(hopper):
    """A 24 GB budget on a large GPU: the device tier is what 24 GB leave beside the weights, not what is free."""
    _, sizing = h200_sizing("7b-mha")
    in_use = sizing.weight_bytes + GIB // 2   # weights and the CUDA context
    free = op.device_free_bytes(GPU, None)
    assert free is None  # off CUDA there is no device limit
    budget_free = 24 * GIB - in_use
    plan = OffloadPlan.decide("auto", max_seq_len=131072, batch=1, sizing=sizing, device=GPU, free_bytes=budget_free,
                              host_budget_bytes=80 * GIB, gpu_budget_bytes=24 * GIB, measure=False)
    assert plan.offloaded and plan.gpu_tokens * sizing.bytes_per_token < budget_free
    assert "GPU budget 24.0 GiB (a smaller GPU's view)" in plan.describe()


def test_a_larger_chunk_where_streaming_would_show(hopper):
    """The cost model: Llama-2-7B's attention (one query head per kv head) hides the host tier's streaming at
    a smaller chunk than a copy-bound shape needs; a slow link asks for larger chunks."""
    _, sizing = h200_sizing("7b-mha")
    kw = dict(batch=1, sizing=sizing, device=GPU, free_bytes=40 * GIB, host_budget_bytes=200 * GIB)
    fast = op._split("auto", sizing, 1, 262144, 40 * GIB, None, op.HostRates(pcie_gbps=54.0), GPU)[0]
    slow = op._split("auto", sizing, 1, 262144, 40 * GIB, None, op.HostRates(pcie_gbps=5.0), GPU)[0]
    assert slow > fast
    assert OffloadPlan.decide("auto", max_seq_len=262144, measure=False, **kw).prefill_chunk in op.CHUNK_CANDIDATES


def test_the_decode_split_balances_the_measured_rates():
    r = op.HostRates(pcie_gbps=54.0, cpu_gbps=60.0, pcie_both_gbps=40.0, cpu_both_gbps=40.0)
    assert r.cpu_share() == pytest.approx(0.5)  # the rates measured together decide
    assert op.HostRates(cpu_gbps=10.0).cpu_share() == 1.0  # no copy engine: all on the CPU
    # both finish together: CPU bytes / CPU rate == streamed bytes / copy rate
    share = op.HostRates(pcie_gbps=50.0, pcie_both_gbps=30.0, cpu_both_gbps=45.0).cpu_share()
    assert share / 45.0 == pytest.approx((1 - share) / 30.0)


def test_context_max_decides_against_the_budget_it_planned_with(tiny, monkeypatch):
    """The default host budget is a share of the memory available now, and that moves (here it shrinks 10% at every
    look): ``--context max`` still gets the cache it planned, not a refusal a few blocks over the new budget."""
    from fastattn_dist.models.bench_model import BenchModelOptions, long_context

    looks = []

    def shrinking():
        looks.append(1)
        return int(0.004 * GIB * 0.9 ** len(looks))   # 80% of it: about 1500 host tokens of the tiny model

    monkeypatch.setattr(op, "host_memory_bytes", shrinking)
    opts = BenchModelOptions(tiny, "tiny", torch.float32, decode_tokens=2, contexts=["max"], kv_offload=[16])
    (run,) = long_context(0, 1, opts)["runs"]
    assert "error" not in run, run
    assert run["gpu_tokens"] == 16 and run["decode_tokens_per_s"] > 0
    assert run["context_max"]["cache_tokens"] == run["context"] + 2 > 16 + 500


def test_the_default_host_budget_is_checked_as_each_spawned_rank_will_see_it(monkeypatch):
    """Before a spawn no launcher says how many ranks share the node: the check divides the default budget by the
    world size, as each rank will (so a cache only one rank's budget holds fails here, in one line, not on the
    ranks)."""
    from fastattn_dist.cli.model_options import check_cache_fits

    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    cfg = config()
    per_rank_token = CacheSizing.of(cfg, model_shape(cfg, 2, 0), 4).bytes_per_token
    host_tokens = 1000
    # 80% of the memory holds 1.5x the host tier of a rank at world size 2: enough for one rank, not for two
    monkeypatch.setattr(op, "host_memory_bytes", lambda: int(1.5 * op.padded_host_tokens(host_tokens)
                                                             * per_rank_token / 0.8))
    args = (cfg, torch.float32, 2, 16, 16 + host_tokens, 1, None, None)
    with pytest.raises(ValueError, match="over the host budget"):
        check_cache_fits(*args)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # a launcher that says one rank per node: the whole budget
    check_cache_fits(*args)


def test_a_host_tier_refuses_8bit_attention_whenever_it_is_set(tiny):
    """kv_offload is checked when it is set after construction too (the long-context benchmark sets it per run):
    a host tier does not take 8-bit attention yet, and must not silently run bf16 under an int8 label."""
    m = LlamaForCausalLM.from_pretrained(tiny, attn_precision="int8")
    with pytest.raises(ValueError, match="host tier"):
        m.kv_offload = 16
    assert m.kv_offload == "off"
    m.kv_offload = "off"


def test_context_max_when_the_chunk_never_settles(hopper, monkeypatch):
    """If the chunk and the context keep moving each other, the capacity is computed again for the last chunk:
    decide() with that chunk accepts exactly that context (it refused a few blocks over)."""
    _, sizing = h200_sizing("7b-mha")
    free, host = int(125.8 * GIB), int(98.7 * GIB)
    real, calls = op._split, []

    def restless(mode, sizing, batch, n, free, prefill_chunk, rates, device):
        if prefill_chunk is not None:
            return real(mode, sizing, batch, n, free, prefill_chunk, rates, device)
        calls.append(n)
        return (16384 if len(calls) % 2 else 4096), 0, "alternating"
    monkeypatch.setattr(op, "_split", restless)
    cap = longest_context("auto", batch=1, sizing=sizing, device=GPU, free_bytes=free, host_budget_bytes=host,
                          pcie_gbps=54.0)
    assert len(calls) == 4  # it never settled
    kw = dict(batch=1, sizing=sizing, device=GPU, free_bytes=free, host_budget_bytes=host, measure=False)
    OffloadPlan.decide("auto", max_seq_len=cap.tokens, prefill_chunk=cap.prefill_chunk, **kw)
    with pytest.raises(ValueError, match="host budget"):
        OffloadPlan.decide("auto", max_seq_len=cap.tokens + 1, prefill_chunk=cap.prefill_chunk, **kw)
