"""Decode attention: a few query rows per sequence against a long KV cache, lengths on the device.

``decode_attention(q, k_cache, v_cache, kv_len)``: q ``[B, Sq, Hq, D]`` (Sq new tokens, the last ones of
each sequence), caches ``[B, L, Hkv, D]`` of which sequence b holds ``kv_len[b]`` tokens (its new ones
included). Query row i of sequence b sits at position ``kv_len[b] - Sq + i`` and sees keys up to its own
(and, with ``window``, the last ``window`` of them). ``kv_len`` stays on the device and is never read
back on a GPU, so a decode step can be captured as a CUDA graph.

Kernels: one row per sequence on CUDA (or under TRITON_INTERPRET=1) goes to a split-K Triton kernel
(flash-decoding): programs over (sequence, kv head, key split), each holding the kv head's G query heads
as the rows of one tile (GQA: K/V read once per group), writing a partial output and its log-sum-exp;
a combine pass weighs the splits. Splits are sized from the cache's length, so the grid never changes
between steps; splits past a sequence's length return at once. Elsewhere the PyTorch kernel runs.
Windows and several query rows with sequences of different lengths need per-sequence offsets: those
go one sequence at a time.

``quantized_decode_attention``: the same over an int8 cache (int8_kv.py): the split-K kernel reads the int8
keys and values and their per-token scales (half the bytes of a 16-bit cache); elsewhere (CPU) the keys up to
the longest sequence are dequantized and go the way above.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..masks import Mask
from . import run_kernel
from .int8_kv import Int8KV
from .select import decode_kernel_for, kernel_for


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: torch.Tensor, *,
                     window: Optional[int] = None, scale: Optional[float] = None, backend: str = "auto",
                     return_lse: bool = False):
    """See the module docstring; ``backend`` as ``fastattn_dist.attention``'s (select.decode_kernel_for decides).
    ``return_lse``: also the log-sum-exp ``[B, Hq, 1]`` (one row per sequence, no window)."""
    B, Sq = q.shape[:2]
    which = decode_kernel_for(backend, q, window)
    if which == "split":
        return split_decode(q, k_cache, v_cache, kv_len, scale, return_lse=return_lse)
    if which == "lengths":  # one row per sequence sees all its keys: key lengths are the whole mask
        return _run(backend, q, k_cache, v_cache, Mask(False, None, kv_len), 0, scale, return_lse)
    if return_lse:
        raise ValueError("decode attention returns an LSE for one row per sequence without a window only")
    lens = kv_len.tolist()
    out = torch.empty_like(q)
    for b, n in enumerate(lens):
        mask = Mask(True, window, None)
        out[b:b + 1] = _run(backend, q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], mask, n - Sq, scale)
    return out


def num_splits(batch: int, kv_heads: int, cache_len: int, sms: int) -> int:
    """Enough programs for about two waves, each split at least 256 keys."""
    want = max(1, -(-2 * sms // max(1, batch * kv_heads)))
    return max(1, min(want, -(-cache_len // 256)))


def quantized_decode_attention(q: torch.Tensor, cache: Int8KV, kv_len: torch.Tensor, *, window: Optional[int] = None,
                               scale: Optional[float] = None, backend: str = "auto", return_lse: bool = False):
    """``decode_attention`` over an int8 cache layer (see the module docstring); the same contract."""
    which = decode_kernel_for(backend, q, window)
    if which == "split":
        return split_decode(q, cache.k, cache.v, kv_len, scale, return_lse=return_lse, quant=cache)
    n = cache.k.shape[1] if q.is_cuda else int(kv_len.max())  # CPU: read the longest length (no graphs there)
    k, v = cache.rows(0, q.shape[0], n, q.dtype)
    return decode_attention(q, k, v, kv_len, window=window, scale=scale, backend=backend, return_lse=return_lse)


def split_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: torch.Tensor,
                 scale: Optional[float] = None, splits: Optional[int] = None, return_lse: bool = False,
                 quant: Optional[Int8KV] = None):
    """The split-K kernel and its combine; q ``[B, 1, Hq, D]``, caches ``[B, L, Hkv, D]`` (unit last stride).
    With ``return_lse`` also the log-sum-exp ``[B, Hq, 1]`` (float32, natural log) of each row. ``quant``: the
    caches are its int8 ``k``, ``v``; its scales and mean go to the kernel too."""
    import triton  # an optional extra: the split-K kernel runs where Triton does

    from .triton_decode import LOG2E, combine_kernel, split_kernel  # Triton kernels: loaded where they run
    from .triton_fa import INTERPRETED  # needs Triton

    B, _, Hq, D = q.shape
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        splits = num_splits(B, Hkv, L, sms)
    block_n = 64 if D <= 128 else 32
    split_len = -(-(-(-L // splits)) // block_n) * block_n
    splits = -(-L // split_len)
    op = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    lp = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    for t in (q, k_cache, v_cache):
        if t.stride(3) != 1:
            raise ValueError("decode attention needs a unit stride on head_dim")
    dot_prec = "ieee" if q.dtype == torch.float32 and (INTERPRETED or not torch.backends.cuda.matmul.allow_tf32) \
        else "tf32"
    qs = (quant.k_scale, quant.v_scale, quant.k_mean) if quant is not None else (k_cache, v_cache, k_cache)
    split_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, *qs, kv_len, op, lp, q.stride(0), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), qs[0].stride(0), qs[0].stride(1),
        op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1), lp.stride(2), Hkv, split_len,
        scale * LOG2E, G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n, DOT_PREC=dot_prec,
        QUANT=quant is not None, INTERPRET=INTERPRETED, num_warps=4)
    # every sequence holds >= 1 key, so one split at least has a finite lse
    out = torch.empty(B, 1, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, 1, dtype=torch.float32, device=q.device) if return_lse else None
    combine_kernel[(B * Hq,)](op, lp, out, lse if return_lse else lp, op.stride(0), op.stride(1), op.stride(2),
                              lp.stride(0), lp.stride(1), lp.stride(2), out.stride(0), out.stride(2), Hq, splits, D=D,
                              S_PAD=triton.next_power_of_2(splits), HAS_LSE=return_lse, num_warps=1)
    return (out, lse) if return_lse else out


def _run(backend: str, q, k, v, mask: Mask, q_offset: int, scale, return_lse: bool = False):
    which = kernel_for(backend, q, k, mask, q_offset, return_lse)
    if which == "torch" and mask.key_lengths is not None:  # the CPU kernel skips blocks past the longest sequence
        longest = int(mask.key_lengths.max())
        k, v = k[:, :longest], v[:, :longest]
    return run_kernel(which, q, k, v, mask, q_offset=q_offset, scale=scale, return_lse=return_lse,
                      block_k=512 if which == "torch" else None)
