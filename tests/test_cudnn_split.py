"""The cuDNN split path's cut and merge on CPU, with float64 standard attention standing in for cuDNN.

A causal tile [r0, r1) = unmasked prefix (keys [0, r0)) + top-left causal diagonal (keys [r0, r1)),
merged by LSE; it must equal the reference on odd shapes, offsets and batch > 1. cuDNN itself is
checked on the GPU (tests/gpu/test_triton_gpu.py).
"""
import pytest
import torch

from fastattn_dist import Causal, KeyPadding, NoMask, SlidingWindow
from fastattn_dist.attention import cudnn_split, reference_attention
from fastattn_dist.reference_block import attention64

calls = []


def fake_cudnn(q, k, v, causal, scale, want_lse):
    """What cuDNN can do: whole sequences, no mask or top-left causal; records each call's shape."""
    calls.append((q.shape[1], k.shape[1], causal))
    o, lse = reference_attention(q, k, v, Causal() if causal else NoMask(), scale=scale, return_lse=True)
    return o, (lse if want_lse else None)  # a merge that used an LSE it did not ask for would fail here


def qkv(B, Sq, Sk, H, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Sq, H, D, generator=g, dtype=torch.float64),
            torch.randn(B, Sk, H, D, generator=g, dtype=torch.float64),
            torch.randn(B, Sk, H, D, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("B,S,r0,r1", [(1, 37, 0, 37), (1, 37, 0, 11), (2, 37, 11, 37), (1, 129, 100, 101),
                                       (2, 130, 64, 97), (1, 7, 6, 7)])
def test_causal_tile_equals_reference(B, S, r0, r1):
    q, k, v = qkv(B, S, S, 3, 32, seed=S + r0)
    calls.clear()
    out = cudnn_split.split_attention(q[:, r0:r1], k, v, Causal(), q_offset=r0, attend=fake_cudnn)
    ref = attention64(q[:, r0:r1], k, v, Causal(), q_offset=r0)
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-12)
    want = [(r1 - r0, r1 - r0, True)] + ([(r1 - r0, r0, False)] if r0 else [])
    if r0 >= S - 1:  # every key lies before or at the tile's one row: a single unmasked call
        want = [(r1 - r0, S, False)]
    assert calls == want, "a causal tile is one top-left causal call, plus one unmasked call for its prefix"


def test_tile_written_into_token_buffer_slice():
    B, S, H, D, r0, r1 = 2, 40, 2, 32, 13, 29
    q, k, v = qkv(B, S, S, H, D, seed=3)
    buf = torch.zeros(B, S, H * D, dtype=torch.float64)
    view = buf[:, r0:r1].view(B, r1 - r0, H, D)
    res = cudnn_split.split_attention(q[:, r0:r1], k, v, Causal(), q_offset=r0, out=view, attend=fake_cudnn)
    assert res.data_ptr() == view.data_ptr()
    assert torch.allclose(view, attention64(q[:, r0:r1], k, v, Causal(), q_offset=r0), atol=1e-12)
    assert buf[:, :r0].abs().sum() == 0 and buf[:, r1:].abs().sum() == 0


def test_unmasked_is_one_call():
    q, k, v = qkv(1, 9, 31, 2, 32, seed=5)
    calls.clear()
    out = cudnn_split.split_attention(q, k, v, NoMask(), q_offset=4, attend=fake_cudnn)
    assert torch.allclose(out, attention64(q, k, v, NoMask()), atol=1e-12)
    assert calls == [(9, 31, False)]


def test_merge_handles_a_part_with_no_keys():
    q, k, v = qkv(1, 5, 5, 2, 32, seed=7)
    o, lse = reference_attention(q, k, v, NoMask(), return_lse=True)
    empty = torch.full_like(lse, float("-inf"))
    out = cudnn_split.merge(torch.empty_like(o), torch.zeros_like(o), empty, o, lse)
    assert torch.allclose(out, o, atol=1e-12)


def test_supports():
    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype)
    q, k = t(1, 16, 4, 128), t(1, 64, 4, 128)
    assert cudnn_split.supports(q, k, Causal(), 48, False)
    assert cudnn_split.supports(q, k, NoMask(), 0, False)
    assert not cudnn_split.supports(q, k, Causal(), 49, False)        # its own keys are missing
    assert cudnn_split.supports(q, k, Causal(), 0, True)              # the LSE of one diagonal call
    assert cudnn_split.supports(q, k, Causal(), 63, True)             # every key before the rows: one call
    assert cudnn_split.supports(q, k, NoMask(), 0, True)
    assert not cudnn_split.supports(q, k, Causal(), 48, True)         # a cut call: its merge gives no LSE
    assert not cudnn_split.supports(q, k, SlidingWindow(8), 0, False)
    assert not cudnn_split.supports(q, k, KeyPadding([64]), 0, False)
    assert cudnn_split.supports(q, t(1, 64, 2, 128), Causal(), 0, False)       # GQA: K/V repeated for the call
    assert not cudnn_split.supports(q, t(1, 64, 3, 128), Causal(), 0, False)   # 4 heads over 3 kv heads
    assert not cudnn_split.supports(t(1, 16, 4, 128, dtype=torch.float32), k.float(), Causal(), 0, False)
    assert not cudnn_split.supports(t(1, 16, 4, 96), t(1, 64, 4, 96), Causal(), 0, False)


@pytest.mark.parametrize("mask,q_offset,Sq,Sk", [("none", 0, 9, 31), ("causal", 0, 9, 31), ("causal", 30, 4, 31)])
def test_single_calls_return_the_lse(mask, q_offset, Sq, Sk):
    """The calls cuDNN makes whole also hand back their LSE (the two-tier KV cache merges parts by it)."""
    q, k, v = qkv(2, Sq, Sk, 2, 32, seed=11)
    m = NoMask() if mask == "none" else Causal()
    calls.clear()
    out, lse = cudnn_split.split_attention(q, k, v, m, q_offset=q_offset, return_lse=True, attend=fake_cudnn)
    ref, ref_lse = attention64(q, k, v, m, q_offset=q_offset, return_lse=True)
    assert len(calls) == 1 and torch.allclose(out, ref, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)
