"""8-bit attention (quantized.py, triton_int8.py) against float64 attention written from the formula.

Accuracy: the torch model of the int8 kernel against naive per-tensor fp8, on Gaussian inputs and on
keys with channel outliers (a 10-sigma offset on a few channels, as SageAttention measures), what K
smoothing buys there, and what quantizing P against the block max buys on rows that see many keys.
Kernel: the Triton kernel under TRITON_INTERPRET=1 against the torch model (the same integer arithmetic) over masks, q_offset, GQA, odd lengths, head_dim 64/128, out=
slices, LSE, both load paths. Shapes are small: the interpreter runs each program in Python.
"""
import importlib
import os
import sys

import pytest
import torch

# Before triton is imported (and before our kernels are decorated): run them in the interpreter, where
# there is no GPU (the numerics tests below run anywhere; the kernel tests need the interpreter).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastattn_dist import Causal, KeyPadding  # noqa: E402
from fastattn_dist.attention import quantized as qz  # noqa: E402
from fastattn_dist.reference_block import attention64  # noqa: E402
from mask_cases import make_mask  # noqa: E402

try:
    # imported earlier without the interpreter: rebuild (triton_int8 calls triton_fa's key-range helper)
    for _mod in ("fastattn_dist.attention.triton_fa", "fastattn_dist.attention.triton_int8"):
        if _mod in sys.modules:
            importlib.reload(sys.modules[_mod])
    from fastattn_dist.attention import triton_int8
    INTERPRETED = triton_int8.INTERPRETED
except ImportError:  # pragma: no cover - depends on the install
    triton_int8, INTERPRETED = None, False

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="kernel tests run under TRITON_INTERPRET=1 on CPU "
                                       "(GPU numbers: scripts/bench_int8_attention.py)")

# -- tolerances, stated once ----------------------------------------------------------------------
# ||out - ref|| / ||ref|| of each precision against float64 attention on the inputs below (measured
# 0.010-0.015 int8, 0.030-0.034 int8-fp8, 0.040-0.049 fp8; the bounds leave ~1.5x headroom).
ERR_BOUND = {"int8": 0.025, "int8-fp8": 0.05, "fp8": 0.075}
# max |lse - ref| (natural log; measured up to 0.014 int8, 0.026 int8-fp8, 0.057 fp8)
LSE_BOUND = {"int8": 0.03, "int8-fp8": 0.04, "fp8": 0.1}
INT8_VS_NAIVE_FP8 = 0.5     # the int8 path's error over naive per-tensor fp8's (measured 0.18-0.32)
# smoothed over unsmoothed error on outlier keys, int8 (measured 0.54); with fp8 somewhere the fp8
# rounding of V / P dominates (measured 0.77-0.86), so there smoothing only has to help
SMOOTHING_GAIN = 0.75
# p_max="block" over "running" on rows that see 4096 keys (measured 0.0183 vs 0.0322: 0.57)
BLOCK_MAX_GAIN = 0.75
# Kernel vs torch model: the same integers and the same fp32 operations; only exp2/log2 may differ in
# the last ulp between the interpreter (NumPy) and torch, which can move one P weight by one step
# (1/127 of that row's largest weight) when p * 127 sits on a rounding edge. So: rows agree to
# SAME_TOL, except at most FLIP_ROWS of them, each off by at most FLIP_TOL.
SAME_TOL, FLIP_ROWS, FLIP_TOL = 1e-5, 0.01, 2e-2
LSE_SAME_TOL = 1e-5

OUTLIER_CHANNELS, OUTLIER_SIGMA = 4, 10.0


def make_qkv(B, Sq, Sk, Hq, Hkv, D, seed, outliers=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, generator=g)
    k = torch.randn(B, Sk, Hkv, D, generator=g)
    v = torch.randn(B, Sk, Hkv, D, generator=g)
    if outliers:  # the same offset on a few channels of every key (std is 1)
        ch = torch.randperm(D, generator=g)[:OUTLIER_CHANNELS]
        k[..., ch] += OUTLIER_SIGMA
    return q.to(dtype), k.to(dtype), v.to(dtype)


def rel(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------------------
# numerics of the torch model (what the kernel computes)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("outliers", [False, True], ids=["gaussian", "outliers"])
@pytest.mark.parametrize("D", [64, 128])
def test_int8_beats_naive_fp8(outliers, D):
    q, k, v = make_qkv(1, 256, 256, 4, 2, D, seed=D + outliers, outliers=outliers)
    ref = attention64(q, k, v, "causal")
    naive = rel(qz.naive_fp8_attention_torch(q, k, v, "causal"), ref)
    int8 = rel(qz.quantized_attention_torch(q, k, v, "causal", precision="int8"), ref)
    assert int8 <= INT8_VS_NAIVE_FP8 * naive, f"int8 error {int8:.4f} vs naive fp8 {naive:.4f}"


def test_smoothing_helps_outlier_keys():
    q, k, v = make_qkv(1, 113, 113, 4, 2, 64, seed=5, outliers=True)
    ref = attention64(q, k, v, "causal")
    for precision in qz.PRECISIONS:
        smooth = rel(qz.quantized_attention_torch(q, k, v, "causal", precision=precision, smooth_k=True), ref)
        plain = rel(qz.quantized_attention_torch(q, k, v, "causal", precision=precision, smooth_k=False), ref)
        bound = SMOOTHING_GAIN * plain if precision == "int8" else plain
        assert smooth < bound, f"{precision}: smoothed {smooth:.4f} vs unsmoothed {plain:.4f}"


def test_block_max_p_keeps_long_rows_accurate():
    """With P taken against the running max, a long flat softmax leaves most weights below 1/254 (int8
    rounds them to 0 or 1); against each block's own max they keep their resolution."""
    S, rows = 4096, 16
    q, k, v = make_qkv(1, rows, S, 2, 1, 128, seed=3, outliers=True)
    ref = attention64(q, k, v, "causal", q_offset=S - rows)
    err = {p_max: rel(qz.quantized_attention_torch(q, k, v, "causal", q_offset=S - rows, p_max=p_max, block_n=128),
                      ref) for p_max in qz.P_MAXES}
    assert err["block"] <= BLOCK_MAX_GAIN * err["running"], err
    assert err["block"] <= ERR_BOUND["int8"]


@pytest.mark.parametrize("precision", qz.PRECISIONS)
@pytest.mark.parametrize("mname", ["causal", "window", "pad_full"])
def test_error_and_lse_bounded(precision, mname):
    """Every precision within its stated error, every mask; LSE (with the smoothing term put back) too."""
    B, Sq, Sk, off = 2, 37, 113, 76
    q, k, v = make_qkv(B, Sq, Sk, 4, 2, 64, seed=11, outliers=True)
    mask = make_mask(mname, B, Sk, window=9)
    ref, ref_lse = attention64(q, k, v, mask, q_offset=off, return_lse=True)
    out, lse = qz.quantized_attention_torch(q, k, v, mask, q_offset=off, precision=precision, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert rel(out, ref) <= ERR_BOUND[precision]
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse.double()[fin] - ref_lse[fin]).abs().max() <= LSE_BOUND[precision]


def test_per_channel_v_no_worse_than_per_head():
    q, k, v = make_qkv(1, 113, 113, 4, 2, 64, seed=13)
    v = v * torch.linspace(0.2, 3.0, 64)  # channels of different ranges: where a head-wide scale is coarse
    ref = attention64(q, k, v, "causal")
    chan = rel(qz.quantized_attention_torch(q, k, v, "causal", v_granularity="channel"), ref)
    head = rel(qz.quantized_attention_torch(q, k, v, "causal", v_granularity="head"), ref)
    assert chan <= head


def test_gqa_equals_repeated_kv_heads_and_tile_equals_rows():
    """GQA reads the shared kv head (same result as repeating it); a row tile at its q_offset gives the
    same numbers as those rows of the whole call (Q scales are per row, K/V statistics per sequence)."""
    q, k, v = make_qkv(2, 70, 70, 8, 2, 64, seed=17)
    whole, lse = qz.quantized_attention_torch(q, k, v, "causal", return_lse=True)
    rep = qz.quantized_attention_torch(q, k.repeat_interleave(4, 2), v.repeat_interleave(4, 2), "causal")
    assert torch.equal(whole, rep)
    r0, r1 = 23, 61
    tile, tlse = qz.quantized_attention_torch(q[:, r0:r1], k, v, "causal", q_offset=r0, return_lse=True)
    assert torch.equal(tile, whole[:, r0:r1]) and torch.equal(tlse, lse[:, :, r0:r1])


def test_torch_out_slice_and_half_inputs():
    B, S, Hq, D = 1, 40, 2, 64
    q, k, v = make_qkv(B, S, S, Hq, 1, D, seed=19, dtype=torch.float16)
    buf = torch.zeros(S + 4, Hq * D, dtype=torch.float16)
    view = buf[2:S + 2].view(B, S, Hq, D)
    res = qz.quantized_attention_torch(q, k, v, "causal", out=view)
    assert res.data_ptr() == view.data_ptr() and buf[:2].abs().sum() == 0 and buf[S + 2:].abs().sum() == 0
    assert rel(view, attention64(q, k, v, "causal")) <= ERR_BOUND["int8"]


def test_keys_past_their_length_never_matter():
    """Key rows at or after key_lengths[b] (garbage, NaN) are zeroed by the quantization, not read."""
    q, k, v = make_qkv(2, 30, 30, 2, 1, 64, seed=23)
    mask = KeyPadding([12, 30])
    out = qz.quantized_attention_torch(q, k, v, mask)
    kp, vp = k.clone(), v.clone()
    kp[0, 12:] = float("nan")
    vp[0, 12:] = float("nan")
    assert torch.equal(qz.quantized_attention_torch(q, kp, vp, mask), out)


def test_bad_input_raises_value_error():
    q, k, v = make_qkv(1, 8, 8, 2, 1, 64, seed=29)
    with pytest.raises(ValueError, match="precision"):
        qz.quantized_attention_torch(q, k, v, precision="int4")
    with pytest.raises(ValueError, match="precision"):
        qz.quantize_qkv(q, k, v, precision="int4")
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        qz.quantized_attention_torch(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        qz.quantize_qkv(q.to(torch.int8), k.to(torch.int8), v.to(torch.int8))
    with pytest.raises(ValueError, match="share a dtype"):
        qz.quantized_attention_torch(q.half(), k, v)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        qz.quantized_attention_torch(q, torch.cat([k, k, k], 2), torch.cat([v, v, v], 2))
    with pytest.raises(ValueError, match="p_max"):
        qz.quantized_attention_torch(q, k, v, p_max="row")
    with pytest.raises(ValueError, match="v_granularity"):
        qz.quantized_attention_torch(q, k, v, v_granularity="token")
    with pytest.raises(ValueError, match="out"):
        qz.quantized_attention_torch(q, k, v, out=torch.empty(1, 8, 2, 32))
    if triton_int8 is not None:
        with pytest.raises(ValueError, match="precision"):
            triton_int8.triton_quantized_attention(q, k, v, precision="int4")
        with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
            triton_int8.triton_quantized_attention(q.to(torch.int8), k.to(torch.int8), v.to(torch.int8))
        with pytest.raises(ValueError, match="q_offset"):
            triton_int8.triton_quantized_attention(q, k, v, q_offset=-1)
        with pytest.raises(ValueError, match="head_dim"):
            big = torch.zeros(1, 4, 1, 320)
            triton_int8.triton_quantized_attention(big, big, big)
    if INTERPRETED:
        kv = triton_int8.quantize_kv_triton(k, v)
        kv.k_scale = kv.k_scale.repeat(1, 1, 2)[..., ::2]  # the same values, every other element
        with pytest.raises(ValueError, match="contiguous"):
            triton_int8.triton_attention_quantized_kv(q, kv, Causal())


# ------------------------------------------------------------------------------------------------
# the Triton kernel (interpreter) against the torch model
# ------------------------------------------------------------------------------------------------

def assert_same_arithmetic(out, want, what):
    """Row-wise agreement (see SAME_TOL / FLIP_ROWS / FLIP_TOL above)."""
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    o, w = out.double().flatten(0, 2), want.double().flatten(0, 2)  # rows: (batch, position, head)
    row_err = (o - w).abs().amax(-1) / w.abs().max()
    off = row_err > SAME_TOL
    assert off.double().mean() <= FLIP_ROWS and row_err.max() <= FLIP_TOL, \
        f"{what}: {int(off.sum())} of {off.numel()} rows differ, worst {row_err.max():.2e}"


def assert_same_lse(lse, want, what):
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(lse)) and torch.equal(lse[~fin], want[~fin]), f"{what}: -inf rows differ"
    if fin.any():
        assert (lse[fin] - want[fin]).abs().max() <= LSE_SAME_TOL, f"{what}: LSE differs"


@pytest.fixture(params=[False, True], ids=["ptr", "tma"])
def load_path(request, monkeypatch):
    """Run a test through the pointer loads and through the TMA-descriptor loads."""
    monkeypatch.setitem(triton_int8.INTERPRET_CONFIG, "USE_TMA", request.param)
    return request.param


def kernel_block_n():
    return triton_int8.INTERPRET_CONFIG["BLOCK_N"]


# (B, Sq, Sk, Hq, Hkv, D, mask, q_offset, precision): a covering subset, not the product. Sq 37 rows at
# q_offset 76 are the last rows of a 113-key sequence (a tile); GQA 1/2/4; head_dim 64 and 128.
CASES = [
    (1, 37, 113, 2, 2, 64, "causal", 76, "int8"),
    (2, 37, 37, 4, 1, 128, "none", 0, "int8"),
    (1, 37, 113, 4, 2, 64, "window", 76, "int8"),
    (2, 37, 113, 4, 1, 64, "pad_causal", 76, "int8"),
    (2, 37, 113, 2, 1, 128, "pad_full", 0, "int8"),
    (1, 1, 113, 4, 2, 64, "causal", 112, "int8"),     # one decode row
    (1, 37, 113, 4, 4, 64, "causal", 76, "fp8"),
    (2, 37, 113, 4, 2, 128, "window", 76, "int8-fp8"),
    (1, 19, 19, 2, 1, 40, "causal", 0, "int8"),       # head_dim padded to 64 inside
]


@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-Sq{c[1]}-Sk{c[2]}-H{c[3]}/{c[4]}-d{c[5]}-{c[6]}"
                         f"-off{c[7]}-{c[8]}")
def test_kernel_matches_torch_model(case):
    B, Sq, Sk, Hq, Hkv, D, mname, off, precision = case
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, seed=sum(case[:6]), outliers=True)
    mask = make_mask(mname, B, Sk, window=9)
    out, lse = triton_int8.triton_quantized_attention(q, k, v, mask, q_offset=off, precision=precision,
                                                      return_lse=True)
    want, want_lse = qz.quantized_attention_torch(q, k, v, mask, q_offset=off, precision=precision,
                                                  return_lse=True, block_n=kernel_block_n())
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_same_arithmetic(out, want, mname)
    assert_same_lse(lse, want_lse, mname)


@needs_interpreter
@pytest.mark.parametrize("precision", ["int8", "int8-fp8"])
def test_kernel_running_max_p(precision):
    """p_max="running" (INT-FlashAttention as published) in the kernel and the model alike."""
    B, Sq, Sk, off = 2, 37, 113, 76
    q, k, v = make_qkv(B, Sq, Sk, 4, 2, 64, seed=47, outliers=True)
    mask = make_mask("pad_causal", B, Sk, window=9)
    out, lse = triton_int8.triton_quantized_attention(q, k, v, mask, q_offset=off, precision=precision,
                                                      return_lse=True, p_max="running")
    want, want_lse = qz.quantized_attention_torch(q, k, v, mask, q_offset=off, precision=precision, return_lse=True,
                                                  p_max="running", block_n=kernel_block_n())
    assert_same_arithmetic(out, want, "running max")
    assert_same_lse(lse, want_lse, "running max")


@needs_interpreter
@pytest.mark.parametrize("precision", qz.PRECISIONS)
def test_quantization_pass_matches_torch(precision):
    """Passes 1-3 give the torch quantization's integers and scales exactly (same fp32/fp64 operations)."""
    q, k, v = make_qkv(2, 8, 113, 2, 2, 64, seed=31, outliers=True)
    kl = torch.tensor([70, 113])
    for smooth, gran in ((True, "channel"), (False, "head")):
        a = qz.quantize_kv(k, v, precision=precision, smooth_k=smooth, key_lengths=kl, v_granularity=gran)
        b = triton_int8.quantize_kv_triton(k, v, precision=precision, smooth_k=smooth, key_lengths=kl,
                                           v_granularity=gran)
        for name in ("k", "k_scale", "k_mean", "v_t", "v_scale"):
            x, y = getattr(a, name), getattr(b, name)
            if x.element_size() == 1:
                x, y = x.view(torch.uint8), y.view(torch.uint8)
            assert x.shape == y.shape and torch.equal(x, y), f"{name} (smooth_k={smooth}, {gran})"


@needs_interpreter
@pytest.mark.parametrize("mname", ["causal", "pad_causal"])
def test_kernel_tma_path(mname, load_path):
    B, Sq, Sk, off = 2, 37, 113, 76
    q, k, v = make_qkv(B, Sq, Sk, 4, 2, 64, seed=37)
    mask = make_mask(mname, B, Sk, window=9)
    out, lse = triton_int8.triton_quantized_attention(q, k, v, mask, q_offset=off, return_lse=True)
    want, want_lse = qz.quantized_attention_torch(q, k, v, mask, q_offset=off, return_lse=True,
                                                  block_n=kernel_block_n())
    assert_same_arithmetic(out, want, mname)
    assert_same_lse(lse, want_lse, mname)


@needs_interpreter
def test_kernel_out_slice_of_token_buffer(load_path):
    """A tile's rows go straight into a slice of the o_proj input buffer; nothing else is touched; K/V
    quantized once serve the tile (the block's use)."""
    B, S, Hq, Hkv, D, r0, r1 = 2, 70, 4, 2, 64, 30, 53
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, seed=41)
    buf = torch.randn(B, S, Hq * D)
    before = buf.clone()
    view = buf[:, r0:r1].view(B, r1 - r0, Hq, D)
    kv = triton_int8.quantize_kv_triton(k, v)
    res = triton_int8.triton_attention_quantized_kv(q[:, r0:r1], kv, Causal(), q_offset=r0, out=view)
    assert res.data_ptr() == view.data_ptr()
    want = qz.quantized_attention_torch(q[:, r0:r1], k, v, "causal", q_offset=r0, block_n=kernel_block_n())
    assert_same_arithmetic(view, want, "out slice")
    touched = torch.zeros(B, S, dtype=torch.bool)
    touched[:, r0:r1] = True
    assert torch.equal(buf[~touched], before[~touched]), "rows outside the slice were written"


@needs_interpreter
def test_kernel_padding_garbage_and_empty_rows():
    """NaN keys past their length stay out; rows that see no key (window + short length) give 0 and -inf."""
    B, S = 2, 30
    q, k, v = make_qkv(B, S, S, 2, 2, 64, seed=43)
    mask = KeyPadding([6, 30], window=4)
    kp, vp = k.clone(), v.clone()
    kp[0, 6:] = float("nan")
    vp[0, 6:] = float("nan")
    out, lse = triton_int8.triton_quantized_attention(q, kp, vp, mask, return_lse=True)
    assert torch.equal(out[0, 9:], torch.zeros_like(out[0, 9:]))
    assert torch.isinf(lse[0, :, 9:]).all() and (lse[0, :, 9:] < 0).all()
    want, want_lse = qz.quantized_attention_torch(q, k, v, mask, return_lse=True, block_n=kernel_block_n())
    assert_same_arithmetic(out, want, "padding")
    assert_same_lse(lse, want_lse, "padding")


# ------------------------------------------------------------------------------------------------
# the kernel behind the entry points (fastattn_dist.attention, the block's sink)
# ------------------------------------------------------------------------------------------------

@needs_interpreter
@pytest.mark.parametrize("precision", qz.PRECISIONS)
def test_attention_entry_with_backend_triton_runs_the_kernel(precision):
    from fastattn_dist import attention
    from fastattn_dist.attention import select

    B, Sq, Sk, off = 2, 37, 113, 76
    q, k, v = make_qkv(B, Sq, Sk, 4, 2, 64, seed=53, outliers=True)
    mask = make_mask("pad_causal", B, Sk, window=9)
    assert select.kernel_for("triton", q, k, mask, off, True, precision) == "quantized-triton"
    out, lse = attention(q, k, v, mask, q_offset=off, backend="triton", precision=precision, return_lse=True)
    want, want_lse = triton_int8.triton_quantized_attention(q, k, v, mask, q_offset=off, precision=precision,
                                                            return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@needs_interpreter
def test_block_tiles_through_the_kernel():
    """The block's 8-bit tiles on the Triton kernel against the block on the torch model (key blocks of 32 vs 64, so
    P rounds a little differently: FLIP_TOL), and tiled == untiled (one quantization for every tile)."""
    from fastattn_dist import TPAttention

    H, heads, kv_heads, S = 128, 4, 2, 70
    g = torch.Generator().manual_seed(59)
    ws = [torch.randn(n, H, generator=g) * H ** -0.5 for n in (H, kv_heads * 32, kv_heads * 32)]
    ws.append(torch.randn(H, H, generator=g) * H ** -0.5)
    x = torch.randn(1, S, H, generator=g)
    outs = {}
    for backend in ("triton", "torch"):
        blk = TPAttention(H, heads, kv_heads, tiles=1, rope_theta=1e4, backend=backend, attn_precision="int8")
        blk.load_full_weights(*ws)
        outs[backend] = (blk(x, tiles=1), blk(x, tiles=3))
    for t in range(2):
        err = (outs["triton"][t] - outs["torch"][t]).abs().max() / outs["torch"][t].abs().max()
        assert err <= FLIP_TOL, err
    assert (outs["triton"][1] - outs["triton"][0]).abs().max() <= 1e-6 * outs["triton"][0].abs().max()
