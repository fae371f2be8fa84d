"""TPAttention's API in one process (world size 1): construction, weights, inputs, masks, errors."""
import math

import pytest
import torch
from torch import nn

from conftest import REL_TOL, rel_err
from fastattn_dist import KeyPadding, Mask, SlidingWindow, TPAttention
from fastattn_dist.rope import Rotary, inverse_frequencies
from fastattn_dist.reference_block import reference_block
from rank_jobs import make_input, make_weights


def test_single_process_block_matches_reference():
    blk = TPAttention(64, 8, 2, rope_theta=500.0)
    w = make_weights(64, 8, 2)
    blk.load_full_weights(*w)
    x = make_input(2, 29, 64)
    for mask in ("causal", "none", SlidingWindow(4), KeyPadding([10, 29])):
        for tiles in (1, 4, "auto"):
            y = blk(x, mask=mask, tiles=tiles)
            ref = reference_block(x, *w, 8, 2, mask=mask, rope_theta=500.0)
            assert rel_err(y, ref) < REL_TOL[torch.float32], (mask, tiles)


def test_load_full_weights_accepts_linear_modules():
    lin = [nn.Linear(32, 32, bias=False), nn.Linear(32, 16, bias=False), nn.Linear(32, 16, bias=False),
           nn.Linear(32, 32, bias=False)]
    blk = TPAttention(32, 4, 2, tiles=1)
    blk.load_full_weights(*lin)
    # q, k and v are one fused column-parallel projection: their rows stacked in that order
    assert torch.equal(blk.qkv.weight, torch.cat([lin[0].weight, lin[1].weight, lin[2].weight]))
    assert torch.equal(blk.o_proj.weight, lin[3].weight)


def _rope_by_hand(x, theta, positions, freqs=None):
    """RoPE from the formula, one element at a time in Python floats: pairs (i, i + D/2), angle p * f_i."""
    B, S, H, D = x.shape
    half = D // 2
    freqs = freqs or [theta ** (-2.0 * i / D) for i in range(half)]
    out = torch.empty_like(x, dtype=torch.float64)
    for s in range(S):
        p = float(positions[s])
        for i in range(half):
            c, sn = math.cos(p * freqs[i]), math.sin(p * freqs[i])
            a, b = x[:, s, :, i].double(), x[:, s, :, i + half].double()
            out[:, s, :, i] = a * c - b * sn
            out[:, s, :, i + half] = b * c + a * sn
    return out


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_the_formula_at_many_positions(theta):
    x = torch.randn(2, 40, 3, 16, dtype=torch.float64)
    positions = [0, 1, 2, 3, 7, 31, 100, 511, 1000, 4095] + list(range(5000, 5030))
    got = Rotary(16, theta).apply(x, torch.tensor(positions))
    assert torch.allclose(got, _rope_by_hand(x, theta, positions), atol=1e-9, rtol=0)
    # float32 inputs: float32 angles, so large positions carry float32 rounding of p * f
    got32 = Rotary(16, theta).apply(x.float(), torch.tensor(positions))
    assert torch.allclose(got32.double(), _rope_by_hand(x, theta, positions), atol=2e-3, rtol=0)
    # default positions are 0..S-1
    assert torch.equal(Rotary(16, theta).apply(x), Rotary(16, theta).apply(x, torch.arange(40)))


def test_rope_scaling_matches_the_formulas():
    D, theta, factor = 16, 500000.0, 8.0
    base = [theta ** (-2.0 * i / D) for i in range(D // 2)]
    lin = inverse_frequencies(D, theta, {"rope_type": "linear", "factor": factor}, torch.float64)
    assert torch.allclose(lin, torch.tensor([f / factor for f in base], dtype=torch.float64), rtol=1e-12)
    cfg = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}
    want = []
    for f in base:  # Llama 3.1: long wavelengths scaled, short ones kept, a linear blend in between
        wavelen = 2 * math.pi / f
        if wavelen < 64 / 4.0:
            want.append(f)
        elif wavelen > 64 / 1.0:
            want.append(f / factor)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append((1 - smooth) * f / factor + smooth * f)
    got = inverse_frequencies(D, theta, cfg, torch.float64)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    assert len({round(g / b, 6) for g, b in zip(want, base)}) >= 3  # the test covers all three regimes
    x = torch.randn(1, 5, 2, D, dtype=torch.float64)
    pos = [0, 3, 17, 900, 4000]
    assert torch.allclose(Rotary(D, theta, cfg).apply(x, torch.tensor(pos)), _rope_by_hand(x, theta, pos, want),
                          atol=1e-9)
    for bad, exc in (({"rope_type": "yarn", "factor": 2.0}, ValueError), ({"rope_type": "linear"}, ValueError),
                     ("linear", TypeError)):
        with pytest.raises(exc):
            Rotary(D, theta, bad)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(hidden_size=64, num_heads=6), ValueError),
    (dict(hidden_size=64, num_heads=8, num_kv_heads=3), ValueError),
    (dict(hidden_size=64, num_heads=8, num_kv_heads=0), ValueError),
    (dict(hidden_size=64.0, num_heads=8), TypeError),
    (dict(hidden_size=64, num_heads=8, tiles=0), ValueError),
    (dict(hidden_size=64, num_heads=8, tiles=-2), ValueError),
    (dict(hidden_size=64, num_heads=8, tiles=2.5), TypeError),
    (dict(hidden_size=64, num_heads=8, tiles="3"), ValueError),
    (dict(hidden_size=64, num_heads=8, tiles=True), TypeError),
    (dict(hidden_size=64, num_heads=8, rope_theta=-1.0), ValueError),
    (dict(hidden_size=64, num_heads=8, dtype=torch.int32), TypeError),
    (dict(hidden_size=64, num_heads=8, backend="fast"), ValueError),
    (dict(hidden_size=64, num_heads=8, link=5), TypeError),
    (dict(hidden_size=64, num_heads=8, comm="nvshmem"), ValueError),
    (dict(hidden_size=40, num_heads=8, num_kv_heads=2, rope_theta=1e4), ValueError),   # head_dim 5: no RoPE pairs
    (dict(hidden_size=64, num_heads=8, backend="cudnn"), ValueError),                 # cuDNN needs a GPU
    (dict(hidden_size=64, num_heads=8, comm=object()), TypeError),
])
def test_bad_construction(kwargs, exc):
    with pytest.raises(exc):
        TPAttention(**kwargs)


def test_bad_weights():
    blk = TPAttention(32, 4, 2)
    good = make_weights(32, 4, 2)
    for i in range(4):
        bad = list(good)
        bad[i] = bad[i].t().contiguous() if i in (1, 2) else torch.randn(3, 3)
        with pytest.raises(ValueError, match="must have shape"):
            blk.load_full_weights(*bad)
    with pytest.raises(TypeError):
        blk.load_full_weights("wq", *good[1:])


@pytest.mark.parametrize("x,mask,exc", [
    (torch.randn(5, 32), "causal", ValueError),                         # 2-D
    (torch.randn(1, 5, 31), "causal", ValueError),                      # wrong hidden
    (torch.randn(1, 0, 32), "causal", ValueError),                      # empty sequence
    (torch.randn(0, 5, 32), "causal", ValueError),                      # empty batch
    (torch.randn(1, 5, 32, dtype=torch.float64), "causal", TypeError),  # dtype
    (torch.randn(1, 5, 32, device="meta"), "causal", ValueError),       # device
    ([[1.0]], "causal", TypeError),
    (torch.randn(1, 5, 32), "diagonal", ValueError),                    # unknown mask
    (torch.randn(1, 5, 32), 7, TypeError),
    (torch.randn(1, 5, 32), "sliding_window:0", ValueError),            # window < 1
    (torch.randn(2, 5, 32), KeyPadding([5, 6]), ValueError),            # length > seq
    (torch.randn(2, 5, 32), KeyPadding([0, 5]), ValueError),            # length < 1
    (torch.randn(2, 5, 32), KeyPadding([5]), ValueError),               # one length per sequence
])
def test_bad_forward_input(x, mask, exc):
    blk = TPAttention(32, 4, 2)
    with pytest.raises(exc):
        blk(x, mask=mask)


def test_a_block_without_weights_refuses_to_compute():
    """Its parameters are uninitialised memory until weights are loaded: a clear error, never NaN or zeros."""
    blk = TPAttention(32, 4, 2)
    q = torch.randn(1, 5, 4, 8)
    kv = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="no qkv and o_proj weights yet"):
        blk(torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="no o_proj weights yet"):
        blk.attend(q, kv, kv)
    blk.load_o_proj_shard(torch.randn(32, 32))
    assert torch.isfinite(blk.attend(q, kv, kv)).all()  # attend needs o_proj only
    with pytest.raises(ValueError, match="no qkv weights yet"):
        blk(torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="shape"):
        blk.load_o_proj_shard(torch.randn(32, 16))


def test_forward_tiles_override_is_validated():
    blk = TPAttention(32, 4, 2)
    with pytest.raises(ValueError, match="tiles must be >= 1"):
        blk(torch.randn(1, 5, 32), tiles=0)


def graph_and_eager(tiles=3):
    """A CUDA-graph block (fake capture on CPU: ``graphs.run_eagerly``, counted) and an eager twin."""
    w = make_weights(64, 8, 2)
    eager = TPAttention(64, 8, 2, tiles=tiles)
    graph = TPAttention(64, 8, 2, tiles=tiles, cuda_graph=True)
    captures = []
    real_capture = graph._graph_capture
    graph._graph_capture = lambda fn: (captures.append(fn), real_capture(fn))[1]
    for blk in (eager, graph):
        blk.load_full_weights(*w)
    return eager, graph, captures


def test_graph_mode_reuses_static_buffers_and_stays_correct():
    """The CUDA-graph code path (static inputs/outputs, one capture per shape), run eagerly on CPU."""
    eager, graph, captures = graph_and_eager()
    outs = []
    for seed in (1, 2, 3):
        x = make_input(2, 21, 64, seed=seed)
        y = graph(x)
        assert torch.equal(y, eager(x))
        outs.append(y)
    assert len(captures) == 1                      # one capture for the repeated shape
    assert outs[0] is outs[2]                      # the static output buffer is handed back each time
    graph(make_input(1, 9, 64))
    assert len(captures) == 2                      # a new shape captures again


def test_graph_mode_alternating_shapes_keep_their_own_buffers():
    eager, graph, captures = graph_and_eager()
    xa, xb, xa2 = make_input(2, 21, 64, seed=1), make_input(1, 9, 64, seed=2), make_input(2, 21, 64, seed=3)
    ya = graph(xa)
    assert torch.equal(ya, eager(xa))
    ya_before = ya.clone()
    yb = graph(xb)
    assert torch.equal(yb, eager(xb))
    assert yb.untyped_storage().data_ptr() != ya.untyped_storage().data_ptr()
    assert torch.equal(ya, ya_before)              # B's replay did not write into A's output
    ya2 = graph(xa2)
    assert torch.equal(ya2, eager(xa2)) and ya2 is ya
    assert len(captures) == 2


def test_graph_cache_is_bounded_and_recaptures_evicted_shapes():
    from fastattn_dist import block as block_mod

    eager, graph, captures = graph_and_eager()
    n = block_mod.MAX_GRAPHS
    for i in range(n + 1):                         # one shape more than the cache holds
        x = make_input(1, 5 + i, 64, seed=i)
        assert torch.equal(graph(x), eager(x))
    assert len(graph._graphs) == n and len(captures) == n + 1
    x = make_input(1, 5, 64, seed=99)              # the oldest shape, evicted: captured again, still right
    assert torch.equal(graph(x), eager(x))
    assert len(captures) == n + 2 and len(graph._graphs) == n


def test_graph_mode_takes_new_key_lengths_for_the_same_shape():
    eager, graph, captures = graph_and_eager()
    x = make_input(2, 13, 64)
    for lengths in ([13, 4], [5, 13], [1, 2]):     # same shape and mask structure: one graph, new lengths copied in
        assert torch.equal(graph(x, mask=KeyPadding(lengths)), eager(x, mask=KeyPadding(lengths))), lengths
    assert len(captures) == 1


def test_forward_never_describes_the_mask(monkeypatch):
    """describe() reads key lengths (a device sync on GPUs): not for the hot path, graph mode or not."""
    def boom(self):
        raise AssertionError("Mask.describe called during forward")
    monkeypatch.setattr(Mask, "describe", boom)
    monkeypatch.setattr(Mask, "__repr__", boom)
    eager, graph, _ = graph_and_eager(tiles="auto")
    x = make_input(2, 11, 64)
    for blk in (eager, graph):
        for mask in ("causal", "none", SlidingWindow(4), KeyPadding([9, 3])):
            for _ in range(2):
                blk(x, mask=mask)


def test_reference_block_memory_is_chunked():
    """The float64 check works at any length the block runs: no S x S tensor (per head or in all)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    S, hidden, heads = 4096, 64, 2
    w = make_weights(hidden, heads, heads)
    x = make_input(1, S, hidden)
    with Largest():
        y = reference_block(x, *w, heads, heads, mask="causal", rope_theta=1e4)
    assert y.shape == (1, S, hidden) and torch.isfinite(y).all()
    assert Largest.numel <= S * S * heads // 8, Largest.numel   # the scores of a chunk of rows, not of all S
