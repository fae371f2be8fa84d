"""Decode attention (one new row per sequence against a KV cache, lengths on the device) against the float64
reference: the split-K Triton kernel under TRITON_INTERPRET=1, and the CPU path the model uses; over the int8
cache too (int8 keys and values with per-token scales)."""
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported: run the kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("interpreter tests: set TRITON_INTERPRET=1 (the GPU checks are in tests/gpu)", allow_module_level=True)

for mod in ("fastattn_dist.attention.triton_fa", "fastattn_dist.attention.triton_decode"):
    if mod in sys.modules:  # imported earlier without the interpreter: rebuild
        importlib.reload(sys.modules[mod])
from fastattn_dist.attention import decode, select  # noqa: E402
from fastattn_dist.attention.int8_kv import Int8KV  # noqa: E402
from fastattn_dist.reference_block import attention64  # noqa: E402


TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def case(B, L, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, L, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, L, Hkv, D, generator=g).to(dtype)
    return q, k, v


def reference(q, k, v, lens):
    """Each sequence alone: its one query (the last position) against its first lens[b] keys."""
    return torch.cat([attention64(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], "none") for b, n in enumerate(lens)])


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,L,Hq,Hkv,lens,splits", [
    (1, 70, 4, 4, [70], 3),            # MHA; splits of 64 keys, the last one partial
    (3, 200, 8, 2, [1, 130, 199], 4),  # GQA 4; a sequence of one token; splits past a sequence's end
    (2, 96, 6, 1, [96, 33], 1),        # MQA, one split
    (2, 333, 4, 2, [300, 5], None),    # splits from the heuristic
])
def test_split_kernel_matches_reference(dtype, B, L, Hq, Hkv, lens, splits):
    q, k, v = case(B, L, Hq, Hkv, 32, dtype, seed=L)
    # keys past each sequence's length must never be read: poison them
    for b, n in enumerate(lens):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    kv_len = torch.tensor(lens)
    out = decode.split_decode(q, k, v, kv_len, splits=splits)
    ref = reference(q, k, v, lens)
    assert not torch.isnan(out).any()
    assert rel(out, ref) < TOL[dtype]


def test_decode_attention_paths_agree():
    """The entry point: split kernel (one row), the CPU kernel, and the per-sequence path (windows)."""
    q, k, v = case(3, 50, 4, 2, 16, torch.float32, seed=3)
    lens = [50, 17, 1]
    kv_len = torch.tensor(lens)
    ref = reference(q, k, v, lens)
    assert select.split_decode_runs(q)
    assert rel(decode.decode_attention(q, k, v, kv_len), ref) < TOL[torch.float32]
    assert rel(decode._run("auto", q, k, v, decode.Mask(False, None, kv_len), 0, None), ref) < TOL[torch.float32]
    # the torch backend asked for: the prefill kernel with the lengths as its mask, same result
    assert select.decode_kernel_for("torch", q, None) == "lengths"
    assert rel(decode.decode_attention(q, k, v, kv_len, backend="torch"), ref) < TOL[torch.float32]
    assert select.decode_kernel_for("auto", q, 5) == "per_sequence"
    # a window of 5: the query at position n-1 sees keys n-5..n-1
    win = torch.cat([attention64(q[b:b + 1], k[b:b + 1, max(0, n - 5):n], v[b:b + 1, max(0, n - 5):n], "none")
                     for b, n in enumerate(lens)])
    assert rel(decode.decode_attention(q, k, v, kv_len, window=5), win) < TOL[torch.float32]


def test_num_splits_fills_the_gpu_but_keeps_splits_long():
    assert decode.num_splits(1, 8, 8192, 132) == 32            # 2 waves of 132 SMs over 8 kv heads
    assert decode.num_splits(1, 8, 300, 132) == 2              # >= 256 keys a split
    assert decode.num_splits(64, 8, 8192, 132) == 1            # enough programs without splitting


def test_split_kernel_returns_the_log_sum_exp():
    q, k, v = case(2, 150, 4, 2, 32, torch.float32, seed=11)
    lens = [150, 40]
    out, lse = decode.split_decode(q, k, v, torch.tensor(lens), splits=3, return_lse=True)
    for b, n in enumerate(lens):
        ref, ref_lse = attention64(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], "none", return_lse=True)
        assert rel(out[b:b + 1], ref) < TOL[torch.float32]
        assert torch.allclose(lse[b].double(), ref_lse[0], atol=1e-5)


# the int8 cache's decode against float64 attention on the unquantized keys: int8 rounding of K and V (measured
# 0.008 with 10-sigma channel offsets in K, smoothed); the split kernel against the dequantizing path: fp32 sums
INT8_KV_ERR, INT8_KERNEL_TOL = 0.02, 1e-5


def int8_case(B, L, Hq, Hkv, D, lens, seed):
    q, k, v = case(B, L, Hq, Hkv, D, torch.float32, seed)
    k[..., :3] += 10.0  # channel outliers: what the smoothing is for
    cache = Int8KV.zeros(B, L, Hkv, D, "cpu")
    cache.write(0, B, 0, k, v)
    return q, k, v, cache


@pytest.mark.parametrize("B,L,Hq,Hkv,lens,splits", [(2, 200, 8, 2, [150, 97], 3), (3, 70, 4, 4, [1, 70, 33], None)])
def test_split_kernel_over_the_int8_cache(B, L, Hq, Hkv, lens, splits):
    q, k, v, cache = int8_case(B, L, Hq, Hkv, 64, lens, seed=L)
    kv_len = torch.tensor(lens)
    out, lse = decode.split_decode(q, cache.k, cache.v, kv_len, splits=splits, return_lse=True, quant=cache)
    # the CPU path: dequantize (the mean added back), then the float kernel
    want, want_lse = decode.quantized_decode_attention(q, cache, kv_len, return_lse=True)
    assert (out - want).abs().max() <= INT8_KERNEL_TOL * want.abs().max()
    assert (lse - want_lse).abs().max() <= INT8_KERNEL_TOL * 10  # the smoothing term q . mean put back
    ref = reference(q, k, v, lens)
    assert rel(out, ref) < INT8_KV_ERR
    for b, n in enumerate(lens):
        _, ref_lse = attention64(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], "none", return_lse=True)
        assert (lse[b].double() - ref_lse[0]).abs().max() < 0.05


def test_int8_decode_paths_agree():
    q, k, v, cache = int8_case(3, 50, 4, 2, 16, [50, 17, 1], seed=7)
    kv_len = torch.tensor([50, 17, 1])
    split = decode.split_decode(q, cache.k, cache.v, kv_len, quant=cache)
    for backend, window in (("auto", None), ("torch", None), ("auto", 5)):
        out = decode.quantized_decode_attention(q, cache, kv_len, backend=backend, window=window)
        kd, vd = cache.rows(0, 3, 50, torch.float32)
        assert torch.equal(out, decode.decode_attention(q, kd, vd, kv_len, backend=backend, window=window))
        if window is None:
            assert (out - split).abs().max() <= INT8_KERNEL_TOL * split.abs().max()


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_two_tier_decode_through_the_split_kernel(share):
    """The two-tier cache's decode (models/kv_offload.py) through the GPU's kernels: the split-K kernel reads the
    device tier and the streamed host blocks through their folded, strided views; the CPU kernel the rest."""
    from fastattn_dist.models.kv_offload import TieredKVCache, decode_split, tiered_decode_attention

    B, Hkv, G, D, S, g = 2, 2, 2, 16, 40, 7
    q, K, V = case(B, S, Hkv * G, Hkv, D, torch.float32, seed=int(share * 10))
    lens = [33, 21]
    cache = TieredKVCache(1, B, S, g, Hkv, D, torch.float32, torch.device("cpu"), block_tokens=4, unit_blocks=2)
    cache.write_block(0, 0, B, 0, K[:, :max(lens) - 1], V[:, :max(lens) - 1])
    split = decode_split(cache, lens, None, share)
    assert select.decode_kernel_for("triton", q, None) == "split" and (share == 0.5) == split.has_cpu
    pos = torch.tensor([n - 1 for n in lens])
    k_new, v_new = K[torch.arange(B), pos][:, None], V[torch.arange(B), pos][:, None]
    cache.append_token(0, k_new, v_new, split)
    out = tiered_decode_attention(cache, 0, q, k_new, v_new, split, backend="triton")
    assert rel(out, reference(q, K, V, lens)) < TOL[torch.float32]
