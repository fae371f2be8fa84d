"""The Triton kernel on a CUDA GPU at full sizes, bf16 and fp16, against a float64 reference.

Skipped without CUDA (and under TRITON_INTERPRET); run with the device tool:
``python -m pytest tests/gpu/test_triton_gpu.py -q``. The reference is standard attention in
float64 on the GPU, computed in chunks of query rows so that no S x S tensor of all heads is held.
Both load paths (pointers, TMA descriptors on Hopper) run with a pinned config; one test goes
through the autotuner.
"""
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                reason="needs CUDA (and compiled, not interpreted, kernels)")

from fastattn_dist import Causal, KeyPadding, NoMask, SlidingWindow  # noqa: E402
from fastattn_dist.attention.reference import reference_attention  # noqa: E402

# ||out - ref|| / ||ref||: the inputs are exact in both; the kernel rounds P to the input type before
# P @ V and rounds the output (bf16: 8 bits of mantissa, fp16: 11).
TOL = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
LSE_TOL = 2e-3

PTR = "128,64,8,3,0"
TMA = "128,64,8,3,1"


def ref_chunked(q, k, v, mask, q_offset=0, chunk=1024):
    """float64 reference, query rows in chunks (each chunk's scores: chunk x Sk x heads)."""
    outs, lses = [], []
    kd, vd = k.double(), v.double()
    for r in range(0, q.shape[1], chunk):
        o, l = reference_attention(q[:, r:r + chunk].double(), kd, vd, mask, q_offset=q_offset + r, return_lse=True)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, 2)


def rel(out, ref):
    assert not torch.isnan(out).any()
    return ((out.double() - ref).norm() / ref.norm()).item()


def inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype)  # noqa: E731
    return mk(B, Sq, Hq, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, D)


MASKS = {
    "none": lambda B, S: NoMask(),
    "causal": lambda B, S: Causal(),
    "window": lambda B, S: SlidingWindow(1000),
    "pad_causal": lambda B, S: KeyPadding(torch.tensor([S - 777, S][:B] + [S] * max(0, B - 2), device="cuda")),
}
BF16, F16 = torch.bfloat16, torch.float16


@pytest.fixture(params=[PTR, TMA], ids=["ptr", "tma"])
def pinned(request, monkeypatch):
    monkeypatch.setenv("FASTATTN_TRITON_CONFIG", request.param)
    return request.param


@pytest.mark.parametrize("dtype,D,mname", [(BF16, 128, "causal"), (BF16, 128, "none"), (F16, 64, "causal"),
                                          (F16, 128, "window"), (BF16, 64, "pad_causal")],
                         ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("B,S", [(1, 8192), (2, 1999)])
def test_full_size(dtype, D, mname, B, S, pinned):
    from fastattn_dist.attention.triton_fa import triton_attention
    Hq, Hkv = 8, 2
    q, k, v = inputs(B, S, S, Hq, Hkv, D, dtype, seed=S + D)
    mask = MASKS[mname](B, S)
    out, lse = triton_attention(q, k, v, mask, return_lse=True)
    ref, ref_lse = ref_chunked(q, k, v, mask)
    err = rel(out, ref)
    assert err < TOL[dtype], f"{err:.2e}"
    assert (lse.double() - ref_lse).abs().max().item() < LSE_TOL


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_tiles_into_token_buffer(dtype, pinned):
    """Four causal tiles written into slices of a [tokens, heads*d] buffer equal the whole call."""
    from fastattn_dist.attention.triton_fa import triton_attention
    S, Hq, Hkv, D = 4096, 16, 4, 128
    q, k, v = inputs(1, S, S, Hq, Hkv, D, dtype, seed=1)
    buf = torch.full((S + 64, Hq * D), float("nan"), device="cuda", dtype=dtype)
    bounds = [0, 1500, 2600, 3500, S]  # unequal tiles, offsets not multiples of the block size
    for r0, r1 in zip(bounds, bounds[1:]):
        view = buf[r0:r1].view(1, r1 - r0, Hq, D)
        triton_attention(q[:, r0:r1], k, v, Causal(), q_offset=r0, out=view)
    assert torch.isnan(buf[S:]).all(), "rows after the last tile were written"
    whole = triton_attention(q, k, v, Causal())
    ref, _ = ref_chunked(q, k, v, Causal())
    tiled = buf[:S].view(1, S, Hq, D)
    assert rel(tiled, ref) < TOL[dtype]
    assert rel(whole, ref) < TOL[dtype]


def test_lse_merges_key_halves(pinned):
    """Attention over two key halves, merged by their LSE, equals attention over all keys."""
    from fastattn_dist.attention.triton_fa import triton_attention
    S, H, D = 4096, 8, 128
    q, k, v = inputs(1, S, S, H, H, D, BF16, seed=2)
    h = S // 2
    o1, l1 = triton_attention(q, k[:, :h], v[:, :h], NoMask(), return_lse=True)
    o2, l2 = triton_attention(q, k[:, h:], v[:, h:], NoMask(), return_lse=True)
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).transpose(1, 2)[..., None]
    w2 = torch.exp(l2 - lse).transpose(1, 2)[..., None]
    merged = w1 * o1.float() + w2 * o2.float()
    ref, ref_lse = ref_chunked(q, k, v, NoMask())
    assert rel(merged, ref) < TOL[BF16]
    assert (lse.double() - ref_lse).abs().max().item() < LSE_TOL


def test_autotuned_and_dispatch():
    """backend="auto" picks the kernel on this GPU; the autotuned config is correct too."""
    from fastattn_dist import attention
    from fastattn_dist.attention import resolve_backend
    major = torch.cuda.get_device_capability()[0]
    assert resolve_backend("auto", torch.device("cuda")) == {9: "cudnn"}.get(major, "triton" if major >= 8 else "sdpa")
    S, H, D = 8192, 16, 128
    q, k, v = inputs(1, S, S, H, H, D, BF16, seed=3)
    out = attention(q, k, v, "causal", backend="triton")
    ref, _ = ref_chunked(q, k, v, Causal())
    assert rel(out, ref) < TOL[BF16]


def test_no_s_by_s_memory(pinned):
    from fastattn_dist.attention.triton_fa import triton_attention
    S, H, D = 16384, 16, 128
    q, k, v = inputs(1, S, S, H, H, D, BF16, seed=4)
    out = torch.empty_like(q)
    triton_attention(q, k, v, Causal(), out=out)  # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    triton_attention(q, k, v, Causal(), out=out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 1 << 20, f"{extra} extra bytes (an S x S fp32 score matrix per head would be {S * S * 4})"


def test_sdpa_fallback_on_gpu():
    from fastattn_dist.attention.sdpa import sdpa_attention
    S, D = 1000, 64
    q, k, v = inputs(2, S, S, 8, 2, D, F16, seed=5)
    for mask, off in ((Causal(), 0), (KeyPadding(torch.tensor([500, 1000], device="cuda"), window=64), 0)):
        out = sdpa_attention(q, k, v, mask, q_offset=off)
        ref, _ = ref_chunked(q, k, v, mask, q_offset=off)
        assert rel(out, ref) < TOL[F16]
    assert math.isfinite(rel(out, ref))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,S", [(1, 8192), (2, 1999)])
def test_cudnn_split_tiles(dtype, B, S):
    """The cudnn backend: causal tiles (prefix + diagonal through cuDNN, merged by LSE) written into
    slices of a [tokens, heads*d] buffer equal the float64 reference; unmasked and GQA calls too."""
    from fastattn_dist import attention
    Hq, D = 8, 128

    def cudnn_attention(q, k, v, mask, q_offset=0, out=None):
        return attention(q, k, v, mask, q_offset=q_offset, out=out, backend="cudnn")
    q, k, v = inputs(B, S, S, Hq, Hq, D, dtype, seed=5)
    buf = torch.full((B, S + 64, Hq * D), float("nan"), device="cuda", dtype=dtype)
    bounds = [0, S // 3 + 1, S // 2 + 7, S - 129, S]
    for r0, r1 in zip(bounds, bounds[1:]):
        cudnn_attention(q[:, r0:r1], k, v, Causal(), q_offset=r0, out=buf[:, r0:r1].view(B, r1 - r0, Hq, D))
    assert torch.isnan(buf[:, S:]).all(), "rows after the last tile were written"
    ref, _ = ref_chunked(q, k, v, Causal())
    assert rel(buf[:, :S].view(B, S, Hq, D), ref) < TOL[dtype]
    ref_none, _ = ref_chunked(q[:, 100:900], k, v, NoMask())
    assert rel(cudnn_attention(q[:, 100:900], k, v, NoMask(), q_offset=100), ref_none) < TOL[dtype]
    q4, k4, v4 = inputs(B, S, S, Hq, 2, D, dtype, seed=6)  # GQA: goes to the Triton kernel
    ref4, _ = ref_chunked(q4[:, 500:], k4, v4, Causal(), q_offset=500)
    assert rel(cudnn_attention(q4[:, 500:], k4, v4, Causal(), q_offset=500), ref4) < TOL[dtype]
