"""host_decode_attention (decode over the host tier of the KV cache) against a float64 reference written from
the attention formula, for both cache layouts, both implementations (the compiled kernel and the torch path)
and the kernel's other vector widths.

Tolerance, stated once: TOL = 1e-5 of the reference's largest magnitude, for every input dtype. bf16 and fp16
inputs are exact in float32 and float64, the reference upcasts the same inputs, and both implementations
accumulate in float32: what differs is float32 rounding only. The lse is compared with the same TOL, absolute
(its values are O(1..10)).

The compiled tests skip only when no C++ compiler or ninja is present (the reason says which); a build that
fails with a compiler present fails them. The first run builds the kernel three times (the CPU's vector width,
and 16 and 4 floats to run the AVX-512 and the narrowest code shapes here): about 15 s each on 2 cores, then
torch's per-user extension cache serves them.
"""
import logging
import math

import pytest
import torch

from fastattn_dist.attention import host_decode as hd
from fastattn_dist.attention.host_decode import host_decode_attention
from fastattn_dist.attention.tiled import tiled_attention
from fastattn_dist.masks import Mask

TOL = 1e-5
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DT_IDS = ["bf16", "fp16", "fp32"]

no_toolchain = hd._missing_toolchain()
needs_compiler = pytest.mark.skipif(no_toolchain is not None, reason=f"compiled kernel not testable: {no_toolchain}")


def reference(q, k, v, lengths, layout, scale=None):
    """float64: out = softmax(scale * q k^T) v over the first lengths[b] keys, lse = logsumexp(scale * q k^T);
    query head h reads kv head h // (Hq / Hkv); no key gives out 0, lse -inf."""
    kd, vd = k.double(), v.double()
    if layout == "bhtd":
        kd, vd = kd.transpose(1, 2), vd.transpose(1, 2)      # -> [B, T, Hkv, D]
    B, _, Hq, D = q.shape
    G = Hq // kd.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, 1, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, 1), float("-inf"), dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        kb = kd[b, :n].repeat_interleave(G, dim=1)           # [n, Hq, D]
        vb = vd[b, :n].repeat_interleave(G, dim=1)
        s = torch.einsum("hd,thd->ht", q[b, 0].double(), kb) * scale
        lse[b, :, 0] = torch.logsumexp(s, dim=1)
        out[b, 0] = torch.einsum("ht,thd->hd", torch.softmax(s, dim=1), vb)
    return out, lse


def make(B, T, Hkv, G, D, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, Hkv, D) if layout == "bthd" else (B, Hkv, T, D)
    q = (torch.randn(B, 1, Hkv * G, D, generator=g) * 2).to(dtype)  # * 2: peaked softmaxes too
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return q, k, v


def check(out, lse, ref_out, ref_lse, what):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32, what
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape, what
    scale = max(ref_out.abs().max().item(), 1e-30)
    err = (out.double() - ref_out).abs().max().item() / scale
    assert err <= TOL, f"{what}: out relative error {err:.2e} > {TOL:.0e}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{what}: -inf lse rows differ"
    fin = torch.isfinite(ref_lse)
    if fin.any():
        lerr = (lse.double()[fin] - ref_lse[fin]).abs().max().item()
        assert lerr <= TOL, f"{what}: lse error {lerr:.2e} > {TOL:.0e}"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), what


# (B, T, Hkv, G, D, key lengths): every GQA ratio, odd key counts, lengths 0 / partial / full, batch 1 and 3
SHAPES = [
    (1, 1, 2, 1, 64, [1]),
    (3, 7, 1, 8, 64, [0, 7, 3]),
    (3, 1000, 2, 4, 128, [1000, 0, 517]),
    (1, 4097, 2, 2, 128, [4097]),
    (3, 4097, 3, 1, 64, [1, 4097, 4000]),
]
SHAPE_IDS = ["T1-G1", "T7-G8-len0", "T1000-G4", "T4097-G2", "T4097-G1-B3"]


@pytest.mark.parametrize("layout", hd.LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B,T,Hkv,G,D,lens", SHAPES, ids=SHAPE_IDS)
def test_torch_path_matches_reference(layout, dtype, B, T, Hkv, G, D, lens):
    q, k, v = make(B, T, Hkv, G, D, dtype, layout, seed=T)
    kl = torch.tensor(lens)
    out, lse = host_decode_attention(q, k, v, kl, layout=layout, impl="torch")
    check(out, lse, *reference(q, k, v, kl, layout), f"torch {layout} {dtype}")


@needs_compiler
@pytest.mark.parametrize("layout", hd.LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B,T,Hkv,G,D,lens", SHAPES, ids=SHAPE_IDS)
def test_compiled_matches_reference_and_torch_path(layout, dtype, B, T, Hkv, G, D, lens):
    assert hd.compiled_kernel() is not None, hd.compiled_unavailable()
    q, k, v = make(B, T, Hkv, G, D, dtype, layout, seed=T)
    kl = torch.tensor(lens)
    out, lse = host_decode_attention(q, k, v, kl, layout=layout, impl="compiled")
    check(out, lse, *reference(q, k, v, kl, layout), f"compiled {layout} {dtype}")
    t_out, t_lse = host_decode_attention(q, k, v, kl, layout=layout, impl="torch")
    check(out, lse, t_out.double(), t_lse.double(), f"compiled vs torch {layout} {dtype}")


@needs_compiler
@pytest.mark.parametrize("width", [16, 4], ids=["avx512-shape", "narrow"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_other_vector_widths(width, dtype):
    """The kernel built for 16- and 4-float vectors (on a narrower CPU the compiler splits them): the AVX-512
    machines run the 16-float code, which this CPU may not otherwise exercise."""
    mod = hd.compiled_kernel(width)
    assert mod is not None, hd.compiled_unavailable(width)
    for layout in hd.LAYOUTS:
        for B, T, Hkv, G, D, lens in [(3, 1000, 2, 4, 128, [1000, 0, 333]), (1, 130, 3, 3, 64, [130])]:
            q, k, v = make(B, T, Hkv, G, D, dtype, layout, seed=B)
            kl = torch.tensor(lens)
            out, lse = hd._compiled_decode(mod, q, k, v, kl, layout, D ** -0.5, 2)
            check(out, lse, *reference(q, k, v, kl, layout), f"width {width} {layout} {dtype} G={G}")


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_slices_of_the_cache_scale_and_threads(impl):
    """What TieredKVCache hands over: a [:, :n] slice of a longer host tier (strided); a custom scale; one
    thread (torch's own count is restored afterwards)."""
    big_k = torch.randn(2, 300, 4, 64).to(torch.bfloat16)
    big_v = torch.randn(2, 300, 4, 64).to(torch.bfloat16)
    q = torch.randn(2, 1, 8, 64).to(torch.bfloat16)
    kl = torch.tensor([250, 9])
    before = torch.get_num_threads()
    for layout, k, v in (("bthd", big_k[:, :250], big_v[:, :250]),
                         ("bhtd", big_k.transpose(1, 2)[:, :, :250], big_v.transpose(1, 2)[:, :, :250])):
        out, lse = host_decode_attention(q, k, v, kl, layout=layout, scale=0.3, threads=1, impl=impl)
        check(out, lse, *reference(q, k, v, kl, layout, scale=0.3), f"{impl} {layout} slice")
        assert torch.get_num_threads() == before


def test_odd_head_dim_runs_on_the_torch_path():
    q, k, v = make(3, 50, 2, 2, 7, torch.bfloat16, "bthd")
    kl = torch.tensor([50, 1, 0])
    out, lse = host_decode_attention(q, k, v, kl)   # auto: the compiled kernel takes D % 16 == 0 only
    check(out, lse, *reference(q, k, v, kl, "bthd"), "odd head_dim")
    if hd.compiled_kernel() is not None:
        with pytest.raises(RuntimeError, match="head_dim 7"):
            host_decode_attention(q, k, v, kl, impl="compiled")


def test_lse_is_tiled_attentions():
    """The natural-log LSE that tiled_attention(..., return_lse=True) gives, so the two merge by LSE (models/host_tier.merge_stacked)."""
    q, k, v = make(2, 300, 2, 4, 64, torch.float32, "bthd")
    kl = torch.tensor([300, 120])
    o_ref, lse_ref = tiled_attention(q, k, v, Mask(False, None, kl), return_lse=True)
    out, lse = host_decode_attention(q, k, v, kl)
    assert (out - o_ref).abs().max() <= TOL * o_ref.abs().max()
    assert (lse - lse_ref).abs().max() <= TOL


def test_no_key_in_any_sequence():
    q, k, v = make(2, 0, 2, 2, 64, torch.bfloat16, "bhtd")   # an empty host tier
    out, lse = host_decode_attention(q, k, v, layout="bhtd")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()


def test_falls_back_once_logged_when_no_compiler(monkeypatch, caplog):
    monkeypatch.setattr(hd, "_modules", {})
    monkeypatch.setattr(hd, "_fallback_told", False)
    monkeypatch.setattr(hd, "_missing_toolchain", lambda: "no C++ compiler ('c++' is not on PATH)")
    q, k, v = make(1, 40, 2, 2, 64, torch.bfloat16, "bthd")
    with caplog.at_level(logging.WARNING, logger="fastattn_dist"):
        for _ in range(2):
            out, lse = host_decode_attention(q, k, v)
            check(out, lse, *reference(q, k, v, [40], "bthd"), "fallback")
    said = [r.getMessage() for r in caplog.records if "C++ kernel is unavailable" in r.getMessage()]
    assert len(said) == 1 and "no C++ compiler" in said[0]
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        host_decode_attention(q, k, v, impl="compiled")


def test_falls_back_when_the_build_fails(monkeypatch, caplog):
    def broken_build(vec_width=None):
        raise RuntimeError("Error building extension 'x'\nmain.cpp:1:1: error: something the compiler refused")
    monkeypatch.setattr(hd, "_modules", {})
    monkeypatch.setattr(hd, "_fallback_told", False)
    monkeypatch.setattr(hd, "_missing_toolchain", lambda: None)
    monkeypatch.setattr(hd, "_build", broken_build)
    q, k, v = make(1, 40, 2, 2, 64, torch.float16, "bhtd")
    with caplog.at_level(logging.WARNING, logger="fastattn_dist"):
        out, lse = host_decode_attention(q, k, v, layout="bhtd")
    check(out, lse, *reference(q, k, v, [40], "bhtd"), "build failure fallback")
    assert any("something the compiler refused" in r.getMessage() for r in caplog.records)


def _good():
    q = torch.randn(2, 1, 4, 16).to(torch.bfloat16)
    k = torch.randn(2, 10, 2, 16).to(torch.bfloat16)
    return q, k, k.clone()


@pytest.mark.parametrize("change,error,match", [
    (lambda q, k, v: (q[:, 0], k, v, {}), ValueError, "q must be 4-D"),
    (lambda q, k, v: (torch.cat([q, q], 1), k, v, {}), ValueError, "one query row"),
    (lambda q, k, v: (q, k[:, :5], v, {}), ValueError, "same shape"),
    (lambda q, k, v: (q, k.double(), v.double(), {}), TypeError, "bf16, fp16 or fp32"),
    (lambda q, k, v: (q, k, v.half(), {}), TypeError, "share a dtype"),
    (lambda q, k, v: (q.to(torch.int32), k, v, {}), TypeError, "bf16, fp16 or fp32"),
    (lambda q, k, v: ([1.0], k, v, {}), TypeError, "torch.Tensor"),
    (lambda q, k, v: (q, k.to("meta"), v.to("meta"), {}), ValueError, "CPU tensor"),
    (lambda q, k, v: (q[:1], k, v, {}), ValueError, "batch"),
    (lambda q, k, v: (q[..., :8], k, v, {}), ValueError, "head_dim"),
    (lambda q, k, v: (q[:, :, :3], k, v, {}), ValueError, "multiple of kv heads"),
    (lambda q, k, v: (q, k, v, {"layout": "bshd"}), ValueError, "layout"),
    (lambda q, k, v: (q, k, v, {"layout": "bhtd"}), ValueError, "multiple of kv heads"),  # 4 % 10 under bhtd
    (lambda q, k, v: (q, k, v, {"impl": "cuda"}), ValueError, "impl"),
    (lambda q, k, v: (q, k, v, {"key_lengths": torch.tensor([10, 11])}), ValueError, "lie in \\[0, 10\\]"),
    (lambda q, k, v: (q, k, v, {"key_lengths": torch.tensor([-1, 3])}), ValueError, "lie in"),
    (lambda q, k, v: (q, k, v, {"key_lengths": torch.tensor([3])}), ValueError, "shape \\[2\\]"),
    (lambda q, k, v: (q, k, v, {"key_lengths": torch.tensor([3.0, 2.0])}), TypeError, "integer"),
    (lambda q, k, v: (q, k, v, {"key_lengths": torch.tensor([3, 2], device="meta")}), ValueError, "CPU tensor"),
    (lambda q, k, v: (q, k, v, {"scale": 0.0}), ValueError, "scale"),
    (lambda q, k, v: (q, k, v, {"scale": float("nan")}), ValueError, "scale"),
    (lambda q, k, v: (q, k, v, {"threads": 0}), ValueError, "threads"),
])
def test_bad_input_is_refused(change, error, match):
    q, k, v, kwargs = change(*_good())
    kl = kwargs.pop("key_lengths", None)
    with pytest.raises(error, match=match):
        host_decode_attention(q, k, v, kl, **kwargs)
