"""The Triton kernel under TRITON_INTERPRET=1 on CPU against the float64 reference.

Odd lengths (1, 17, 130), every mask, q_offset, GQA 1/2/4, head_dim 32/64, fp32 and fp16, the
out= slice of a [tokens, heads*head_dim] buffer, LSE, and keys a mask skips poisoned with NaN.
Both load paths run: plain pointers and the TMA descriptors (the interpreter emulates them).
Sizes are small on purpose: the interpreter runs each program in Python.
"""
import importlib
import logging
import os
import sys

import pytest
import torch

# Before triton is imported (and before our kernels are decorated): run them in the interpreter.
# Only where there is no GPU, so that a full `pytest` on a GPU machine keeps the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("interpreter tests: set TRITON_INTERPRET=1 (the GPU checks are in tests/gpu)", allow_module_level=True)

from fastattn_dist import Causal, KeyPadding, NoMask, SlidingWindow, attention  # noqa: E402
from fastattn_dist.reference_block import attention64  # noqa: E402
from mask_cases import make_mask  # noqa: E402

if "fastattn_dist.attention.triton_fa" in sys.modules:  # imported earlier without the interpreter: rebuild
    importlib.reload(sys.modules["fastattn_dist.attention.triton_fa"])
from fastattn_dist.attention import triton_fa  # noqa: E402

assert triton_fa.INTERPRETED

# ||out - ref|| / ||ref|| by input dtype (stated once). fp32: exact products in the interpreter (no
# TF32 on CPU), so only summation-order rounding; fp16: P is rounded to fp16 before P @ V.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
LSE_TOL = 1e-4  # absolute, natural log units; LSE is accumulated in fp32 for every input dtype


def rand(*shape, dtype, g):
    return torch.randn(*shape, generator=g).to(dtype)


def qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return rand(B, Sq, Hq, D, dtype=dtype, g=g), rand(B, Sk, Hkv, D, dtype=dtype, g=g), rand(B, Sk, Hkv, D, dtype=dtype, g=g)


def rel(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(out, lse, q, k, v, mask, q_offset, what):
    ref, ref_lse = attention64(q, k, v, mask, q_offset=q_offset, return_lse=True)
    err = rel(out, ref)
    assert err <= TOL[q.dtype], f"{what}: ||out-ref||/||ref|| = {err:.2e} > {TOL[q.dtype]:.0e}"
    if lse is not None:
        assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
        fin = torch.isfinite(ref_lse)
        assert torch.equal(fin, torch.isfinite(lse)), f"{what}: -inf LSE rows differ"
        assert torch.equal(ref_lse[~fin], lse.double()[~fin])
        if fin.any():
            d = (lse.double()[fin] - ref_lse[fin]).abs().max().item()
            assert d <= LSE_TOL, f"{what}: LSE off by {d:.2e}"


@pytest.fixture(params=[False, True], ids=["ptr", "tma"])
def load_path(request, monkeypatch):
    """Run a test through the pointer loads and through the TMA-descriptor loads."""
    monkeypatch.setitem(triton_fa.INTERPRET_CONFIG, "USE_TMA", request.param)
    return request.param


# (B, Sq, Sk, Hq, Hkv, D, mask, q_offset, dtype): a covering subset, not the full product, so the
# interpreter stays fast. Every mask meets an odd length, q_offset > 0, a GQA ratio and both dtypes.
F32, F16 = torch.float32, torch.float16
CASES = [
    (1, 1, 1, 2, 2, 32, "causal", 0, F32),
    (2, 17, 17, 4, 1, 32, "none", 0, F16),
    (2, 17, 17, 2, 1, 64, "causal", 0, F32),
    (1, 130, 130, 2, 2, 32, "causal", 0, F16),
    (1, 130, 130, 4, 1, 64, "none", 0, F32),
    (1, 33, 130, 4, 2, 32, "causal", 97, F32),   # a tile of the last rows at its causal offset
    (1, 1, 130, 4, 4, 64, "causal", 129, F16),   # one decode row
    (2, 17, 17, 4, 2, 32, "window", 0, F32),
    (1, 130, 130, 2, 1, 64, "window", 0, F16),
    (1, 41, 130, 2, 2, 32, "window", 89, F32),
    (2, 17, 17, 2, 2, 64, "pad_causal", 0, F16),
    (2, 33, 130, 4, 1, 32, "pad_causal", 97, F32),
    (2, 130, 130, 2, 1, 32, "pad_full", 0, F32),
    (2, 17, 17, 4, 2, 64, "pad_full", 0, F16),
    (1, 17, 130, 2, 1, 32, "none", 40, F16),     # q_offset is irrelevant without causal
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-Sq{c[1]}-Sk{c[2]}-H{c[3]}/{c[4]}-d{c[5]}-{c[6]}"
                         f"-off{c[7]}-{str(c[8])[6:]}")
def test_matches_reference(case):
    B, Sq, Sk, Hq, Hkv, D, mname, off, dt = case
    q, k, v = qkv(B, Sq, Sk, Hq, Hkv, D, dt, seed=hash(case) % 1000)
    mask = make_mask(mname, B, Sq + off, window=7)
    out, lse = triton_fa.triton_attention(q, k, v, mask, q_offset=off, return_lse=True)
    assert out.shape == q.shape and out.dtype == dt
    check(out, lse, q, k, v, mask, off, mname)


@pytest.mark.parametrize("mname", ["causal", "window", "pad_causal", "pad_full"])
def test_tma_path_matches_reference(mname, load_path):
    B, Sq, Sk, off = 2, 37, 100, 63
    q, k, v = qkv(B, Sq, Sk, 4, 2, 32, F32, seed=7)
    mask = make_mask(mname, B, Sq + off, window=7)
    out, lse = triton_fa.triton_attention(q, k, v, mask, q_offset=off, return_lse=True)
    check(out, lse, q, k, v, mask, off, mname)


def test_through_attention_api():
    q, k, v = qkv(1, 17, 17, 2, 1, 32, F32, seed=3)
    out = attention(q, k, v, "causal", backend="triton")
    check(out, None, q, k, v, Causal(), 0, "api")


@pytest.mark.parametrize("B", [1, 2])
def test_out_slice_of_token_buffer(B, load_path):
    """A tile's rows go straight into a slice of the o_proj input buffer; nothing else is touched."""
    S, Hq, Hkv, D, r0, r1 = 70, 4, 2, 32, 30, 53
    q, k, v = qkv(B, S, S, Hq, Hkv, D, F32, seed=11)
    buf = torch.randn(B * S, Hq * D)
    before = buf.clone()
    if B == 1:
        view = buf[r0:r1].view(1, r1 - r0, Hq, D)
    else:
        view = buf.view(B, S, Hq * D)[:, r0:r1].view(B, r1 - r0, Hq, D)
    qt = q[:, r0:r1]  # a strided view too
    res = triton_fa.triton_attention(qt, k, v, Causal(), q_offset=r0, out=view)
    assert res.data_ptr() == view.data_ptr()
    check(view, None, qt, k, v, Causal(), r0, "out slice")
    touched = torch.zeros(B, S, dtype=torch.bool)
    touched[:, r0:r1] = True
    touched = touched.view(B * S)
    assert torch.equal(buf[~touched], before[~touched]), "rows outside the slice were written"


def test_strided_qkv_from_fused_projection():
    """q, k, v as column slices of one fused [B, S, (Hq + 2 Hkv) * D] projection output."""
    B, S, Hq, Hkv, D = 2, 45, 4, 1, 64
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(B, S, (Hq + 2 * Hkv) * D, generator=g).half()
    q = fused[..., : Hq * D].view(B, S, Hq, D)
    k = fused[..., Hq * D: (Hq + Hkv) * D].view(B, S, Hkv, D)
    v = fused[..., (Hq + Hkv) * D:].view(B, S, Hkv, D)
    out = torch.empty(B, Hq, S, D, dtype=torch.half).transpose(1, 2)  # a non-contiguous out as well
    triton_fa.triton_attention(q, k, v, Causal(), out=out)
    check(out, None, q, k, v, Causal(), 0, "fused qkv")


@pytest.mark.parametrize("mname", ["causal", "window", "pad_causal"])
def test_skipped_keys_never_read(mname, load_path):
    """Keys no query of this call may see are NaN: the output must stay finite and correct."""
    B, Sq, Sk, off = 2, 20, 96, 50
    q, k, v = qkv(B, Sq, Sk, 2, 1, 32, F32, seed=13)
    mask = {"causal": Causal(), "window": SlidingWindow(9), "pad_causal": KeyPadding([40, 61])}[mname]
    k_pos = torch.arange(Sk)
    last = off + Sq - 1
    bad = (k_pos > last)[None].expand(B, Sk).clone()  # after the last query row
    if mname == "window":
        bad |= (k_pos <= off - 9)[None]  # before the first row's window
    if mname == "pad_causal":
        bad |= k_pos[None] >= mask.key_lengths[:, None]  # padding
    kp, vp = k.clone(), v.clone()
    kp[bad] = float("nan")
    vp[bad] = float("nan")
    out, lse = triton_fa.triton_attention(q, kp, vp, mask, q_offset=off, return_lse=True)
    assert torch.isfinite(out).all()
    check(out, lse, q, k, v, mask, off, mname)


def test_rows_with_no_visible_key_are_zero():
    """Window + key lengths: rows past key_len + window - 1 see nothing -> 0 and LSE -inf."""
    B, Sq, Sk = 2, 30, 30
    q, k, v = qkv(B, Sq, Sk, 2, 2, 32, F32, seed=17)
    mask = KeyPadding([6, 30], window=4)
    out, lse = triton_fa.triton_attention(q, k, v, mask, return_lse=True)
    assert torch.equal(out[0, 9:], torch.zeros_like(out[0, 9:]))
    assert torch.isinf(lse[0, :, 9:]).all() and (lse[0, :, 9:] < 0).all()
    check(out, lse, q, k, v, mask, 0, "empty rows")


def test_head_dim_not_power_of_two():
    q, k, v = qkv(1, 19, 19, 2, 1, 40, F32, seed=19)
    out = triton_fa.triton_attention(q, k, v, Causal())
    check(out, None, q, k, v, Causal(), 0, "d=40")


def test_sdpa_backend_on_cpu():
    """The fallback backend's mask handling (it is exercised for real only on old GPUs)."""
    from fastattn_dist.attention.sdpa import sdpa_attention
    q, k, v = qkv(2, 17, 40, 4, 2, 32, torch.float64, seed=23)
    for mask, off in ((Causal(), 23), (NoMask(), 0), (KeyPadding([9, 40], window=5), 23)):
        out = sdpa_attention(q, k, v, mask, q_offset=off)
        ref = attention64(q, k, v, mask, q_offset=off)
        assert rel(out, ref) < 1e-12
    q, k, v = qkv(1, 17, 17, 2, 2, 32, torch.float64, seed=29)
    out = sdpa_attention(q, k, v, Causal())
    assert rel(out, attention64(q, k, v, Causal())) < 1e-12


def test_auto_backend_per_family_and_fallback_logged_once(monkeypatch, caplog):
    from fastattn_dist.attention import select
    monkeypatch.setattr(select, "_told", set())
    cuda0 = torch.device("cuda", 0)
    for cc, want in (((9, 0), "cudnn"), ((8, 0), "triton"), ((7, 5), "sdpa")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None, cc=cc: cc)
        assert select.resolve_backend("auto", cuda0) == want, cc
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: (9, 0))
    monkeypatch.setattr(select, "_triton_importable", lambda: "Triton is not importable (test)")
    with caplog.at_level(logging.WARNING, logger="fastattn_dist"):
        assert select.resolve_backend("auto", cuda0) == "sdpa"
        assert select.resolve_backend("auto", cuda0) == "sdpa"
    msgs = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(msgs) == 1 and "not importable" in msgs[0]
    assert select.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_kernel_fallback_chain():
    """The one place that routes a call: cudnn -> triton (what cuDNN cannot take) -> torch (fp64); sdpa -> torch (LSE)."""
    from fastattn_dist.attention import select
    q16, k16, _ = qkv(1, 8, 8, 2, 2, 64, F16, seed=1)
    q64, k64, _ = qkv(1, 8, 8, 2, 2, 64, torch.float64, seed=1)
    assert select.kernel_for("cudnn", q16, k16, Causal(), 0, False) == "triton"      # CPU tensors: no cuDNN
    assert select.kernel_for("cudnn", q64, k64, Causal(), 0, False) == "torch"
    assert select.kernel_for("triton", q64, k64, Causal(), 0, False) == "torch"
    assert select.kernel_for("sdpa", q16, k16, Causal(), 0, True) == "torch"
    assert select.kernel_for("sdpa", q16, k16, Causal(), 0, False) == "sdpa"
    assert select.kernel_for("torch", q16, k16, Causal(), 0, True) == "torch"
    assert select.available("cudnn", torch.device("cpu")) is not None
    assert select.available("triton", torch.device("cpu")) is None  # this module runs under the interpreter
    assert "unknown" in select.available("fast", torch.device("cpu"))


@pytest.mark.parametrize("dt", [F32, F16])
def test_merge_kernel_matches_torch_formula(dt):
    """The one-pass merge of the cuDNN split path (strided out slice, -inf LSE rows) equals the torch lines."""
    from fastattn_dist.attention import cudnn_split
    g = torch.Generator().manual_seed(31)
    B, S, H, D = 2, 13, 3, 32
    o_a, o_b = rand(B, H, S, D, dtype=dt, g=g).transpose(1, 2), rand(B, S, H, D, dtype=dt, g=g)
    lse_a, lse_b = torch.randn(B, H, S, generator=g) * 3, torch.randn(B, H, S, generator=g) * 3
    lse_a[0, 1, 4] = float("-inf")  # a row that saw no key in part a
    buf = torch.zeros(B, S + 4, H * D, dtype=dt)
    out = buf[:, 2:S + 2].view(B, S, H, D)
    triton_fa.merge_partials(out, o_a, lse_a, o_b, lse_b)
    want = cudnn_split.merge(torch.empty(B, S, H, D, dtype=dt), o_a, lse_a, o_b, lse_b)
    assert torch.allclose(out.float(), want.float(), atol=TOL[dt], rtol=TOL[dt])
    assert torch.equal(out[0, 4, 1], o_b[0, 4, 1])
    assert buf[:, :2].abs().sum() == 0 and buf[:, S + 2:].abs().sum() == 0


@pytest.mark.parametrize("major,d_pad", [(9, 64), (9, 128), (9, 256), (8, 128)])
def test_calls_without_tma_descriptors_can_only_get_pointer_configs(major, d_pad):
    """Triton's autotuner caches its pick per key and skips pruning on a hit, so the TMA choice is made by which
    launcher a call reaches: one that may hand a TMA config to a call whose layout gave no descriptors (a strided
    KV-cache slice) compiles ``q_desc.load`` on None (seen on an H200, 2026-12-01)."""
    without = triton_fa._tuner(major, d_pad, False)
    assert without.configs and not any(c.kwargs["USE_TMA"] for c in without.configs)
    with_descs = triton_fa._tuner(major, d_pad, True)
    assert with_descs is not without
    assert any(c.kwargs["USE_TMA"] for c in with_descs.configs) == (major >= 9 and d_pad < 256)
    assert triton_fa._tuner(major, d_pad, False) is without  # one launcher per family: tuned once per process
