"""Attention backends against a float64 reference: odd shapes, GQA, every mask, q_offset, fp32/bf16."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_ref, rel_err
from fastattn_dist import Causal, KeyPadding, NoMask, SlidingWindow, attention
from fastattn_dist.attention import BlockStats, reference_attention
from fastattn_dist.reference_block import attention64

MASKS = {
    "none": lambda B, S: NoMask(),
    "causal": lambda B, S: Causal(),
    "window7": lambda B, S: SlidingWindow(7),
    "pad_causal": lambda B, S: KeyPadding([max(1, S // 2), S][:B]),
    "pad_full": lambda B, S: KeyPadding([S, max(1, S - 5)][:B], causal=False),
}


def make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=g).to(dtype)
    return q, k, v


def ref64(q, k, v, mask, q_offset=0):
    """The independent float64 reference (reference_block.py: written from the formula, imports nothing of ours)."""
    return attention64(q, k, v, mask, q_offset=q_offset, return_lse=True)


def test_reference_matches_sdpa_float64():
    """The reference itself, against PyTorch's SDPA math path (an independent implementation)."""
    q, k, v = make_qkv(2, 37, 37, 4, 4, 32, torch.float64)
    for mask, causal in ((NoMask(), False), (Causal(), True)):
        out = reference_attention(q, k, v, mask)
        sd = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=causal).transpose(1, 2)
        assert rel_err(out, sd) < 1e-12
    # the reference backend (part of the product) against the independent float64 reference, every mask
    for name, make in MASKS.items():
        m = make(2, 37)
        for off in (0, 11):
            assert rel_err(reference_attention(q[:, off:], k, v, m, q_offset=off), ref64(q[:, off:], k, v, m, off)[0]) \
                < 1e-12, name


@pytest.mark.parametrize("seq", [1, 7, 37, 129])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_torch_backend_fp32(seq, gqa, mask_name):
    head_dim = {1: 32, 2: 64, 4: 128, 8: 32}[gqa]
    B, Hkv = 2, 2
    q, k, v = make_qkv(B, seq, seq, Hkv * gqa, Hkv, head_dim, torch.float32, seed=seq * 10 + gqa)
    mask = MASKS[mask_name](B, seq)
    ref, ref_lse = ref64(q, k, v, mask)
    out, lse = attention(q, k, v, mask, backend="torch", return_lse=True, block_q=16, block_k=32)
    assert_close_to_ref(out, ref, torch.float32, f"out {mask_name}")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() < 1e-4


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("q_offset", [0, 5, 64])
def test_q_offset_tile_equals_rows_of_whole(head_dim, mask_name, q_offset):
    """A tile of rows at its offset is the same as those rows of the whole-sequence call."""
    B, S = 2, 101
    q, k, v = make_qkv(B, S, S, 8, 2, head_dim, torch.float32, seed=head_dim + q_offset)
    mask = MASKS[mask_name](B, S)
    rows = slice(q_offset, min(S, q_offset + 23))
    ref, _ = ref64(q[:, rows], k, v, mask, q_offset=q_offset)
    whole, _ = ref64(q, k, v, mask)
    assert rel_err(ref, whole[:, rows]) < 1e-12
    out = attention(q[:, rows], k, v, mask, q_offset=q_offset, backend="torch", block_q=8, block_k=16)
    assert_close_to_ref(out, ref, torch.float32, "tile")


@pytest.mark.parametrize("seq", [7, 129])
@pytest.mark.parametrize("mask_name", ["causal", "window7", "pad_causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_half(seq, mask_name, dtype):
    q, k, v = make_qkv(2, seq, seq, 8, 2, 64, dtype, seed=seq)
    mask = MASKS[mask_name](2, seq)
    ref, _ = ref64(q, k, v, mask)
    out = attention(q, k, v, mask, backend="torch", block_q=32, block_k=64)
    assert out.dtype == dtype
    assert_close_to_ref(out, ref, dtype, mask_name)


def test_reference_backend_through_public_api():
    q, k, v = make_qkv(1, 37, 37, 4, 1, 32, torch.float32)
    ref, _ = ref64(q, k, v, Causal())
    out = torch.full_like(q, float("nan"))
    res = attention(q, k, v, "causal", backend="reference", out=out)
    assert res is out
    assert_close_to_ref(out, ref, torch.float32)


def test_out_argument_writes_into_a_slice_of_a_bigger_buffer():
    """The block's use: write a tile straight into rows of the [tokens, heads*dim] o_proj input."""
    B, S, Hq, Hkv, D = 1, 40, 4, 2, 32
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, torch.float32)
    buf = torch.full((S, Hq * D), 7.0)
    r0, r1 = 11, 29
    dst = buf[r0:r1].view(1, r1 - r0, Hq, D)
    attention(q[:, r0:r1], k, v, "causal", q_offset=r0, backend="torch", out=dst, block_q=8, block_k=8)
    ref, _ = ref64(q, k, v, Causal())
    assert_close_to_ref(buf[r0:r1].view(1, -1, Hq, D), ref[:, r0:r1], torch.float32)
    assert (buf[:r0] == 7).all() and (buf[r1:] == 7).all()


def test_skipped_blocks_cost_nothing():
    """Causal: the strictly-upper key blocks are skipped, never computed; poison there must not leak."""
    S, bs = 128, 16
    q, k, v = make_qkv(1, S, S, 2, 2, 32, torch.float32)
    stats = BlockStats()
    attention(q, k, v, "causal", backend="torch", block_q=bs, block_k=bs, stats=stats)
    n = S // bs
    assert stats.skip == n * (n - 1) // 2 and stats.partial == n and stats.full == n * (n - 1) // 2
    # Sliding window of 16: only blocks on and just below the diagonal are touched.
    stats = BlockStats()
    attention(q, k, v, SlidingWindow(16), backend="torch", block_q=bs, block_k=bs, stats=stats)
    assert stats.full + stats.partial <= 2 * n and stats.skip >= n * n - 2 * n
    # Keys a window hides are never read: NaN there changes nothing.
    kp, vp = k.clone(), v.clone()
    kp[:, :64], vp[:, :64] = float("nan"), float("nan")
    rows = slice(96, 128)
    out = attention(q[:, rows], kp, vp, SlidingWindow(16), q_offset=96, backend="torch", block_q=bs, block_k=bs)
    ref, _ = ref64(q[:, rows], k, v, SlidingWindow(16), q_offset=96)
    assert_close_to_ref(out, ref, torch.float32)


def test_rows_without_visible_keys_are_zero():
    # Window 2, keys padded to length 3: queries at positions >= 5 see nothing.
    q, k, v = make_qkv(1, 8, 8, 2, 2, 32, torch.float32)
    mask = KeyPadding([3], window=2)
    out, lse = attention(q, k, v, mask, backend="torch", return_lse=True, block_q=4, block_k=4)
    ref, ref_lse = ref64(q, k, v, mask)
    assert (out[:, 5:] == 0).all() and torch.isinf(lse[..., 5:]).all()
    assert_close_to_ref(out, ref, torch.float32)


@pytest.mark.parametrize("bad,exc", [
    (dict(q=torch.randn(2, 5, 4)), ValueError),                                  # not 4-D
    (dict(q=torch.randn(1, 5, 4, 8, dtype=torch.float64)), TypeError),           # dtype mismatch
    (dict(q=torch.randint(0, 3, (1, 5, 4, 8))), TypeError),                      # integer
    (dict(k=torch.randn(1, 5, 3, 8), v=torch.randn(1, 5, 3, 8)), ValueError),    # 4 heads vs 3 kv heads
    (dict(v=torch.randn(1, 6, 2, 8)), ValueError),                               # k/v shapes differ
    (dict(q=torch.randn(1, 0, 4, 8)), ValueError),                               # empty sequence
    (dict(q=torch.randn(1, 5, 4, 16)), ValueError),                              # head_dim differs
    (dict(q=torch.randn(1, 5, 4, 8, device="meta")), ValueError),                # device differs
    (dict(q_offset=-1), ValueError),
    (dict(backend="cuda-magic"), ValueError),
    (dict(mask="casual"), ValueError),
    (dict(out=torch.empty(1, 5, 4, 4)), ValueError),
    (dict(block_k=-1), ValueError),                                              # once returned zeros
    (dict(block_q=-1), ValueError),                                              # once returned garbage
    (dict(block_q=0), ValueError),
    (dict(block_k=2.5), ValueError),
    (dict(scale=0.0), ValueError),
    (dict(scale=float("nan")), ValueError),
    (dict(scale=-1.0), ValueError),
    (dict(q_offset=1.5), ValueError),
    (dict(return_lse="yes"), TypeError),
    (dict(backend="cudnn"), ValueError),                                         # needs a GPU
    (dict(out="buffer"), ValueError),
])
def test_bad_input(bad, exc):
    args = dict(q=torch.randn(1, 5, 4, 8), k=torch.randn(1, 5, 2, 8), v=torch.randn(1, 5, 2, 8),
                mask="causal", q_offset=0, backend="torch", out=None)
    args.update(bad)
    with pytest.raises(exc):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mask"), **args)
