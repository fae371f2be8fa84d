"""Two-level tiled flash attention in PyTorch: outer query tiles, inner key blocks, online softmax.

The CPU path (and the readable model of the GPU kernel). Per (query tile, key block) pair
the mask description says FULL (no mask arithmetic), PARTIAL (mask this block only) or
SKIP (never touched). GQA is done by grouping query heads over their KV head, so K and V
are never repeated in memory. Accumulation is float32 for half inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..masks import BlockKind, Mask

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 256


@dataclass
class BlockStats:
    """How many (query tile, key block) pairs of each kind were met: shows that skipping works."""

    full: int = 0
    partial: int = 0
    skip: int = 0

    def add(self, kind: BlockKind) -> None:
        setattr(self, kind.value, getattr(self, kind.value) + 1)


def _query_tile(q_tile, kt, vg, mask: Mask, q0: int, q_pos, k_pos_all, kl, len_min, len_max, block_k: int, stats):
    """One query tile ``[B, Hkv, G * tq, D]`` (already scaled) over the key blocks the mask does not skip, with the
    online softmax: returns (unnormalised accumulator, running max, running sum)."""
    B, Hkv, rows, D = q_tile.shape
    tq, Sk, acc_dt = q_pos.numel(), kt.shape[-1], q_tile.dtype
    G = rows // tq
    m = torch.full((B, Hkv, rows, 1), float("-inf"), dtype=acc_dt, device=q_tile.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(B, Hkv, rows, D, dtype=acc_dt, device=q_tile.device)
    for ks in range(0, Sk, block_k):
        ke = min(ks + block_k, Sk)
        kind = mask.classify(q0, q0 + tq, ks, ke, len_min, len_max)
        if stats is not None:
            stats.add(kind)
        if kind is BlockKind.SKIP:
            continue
        s = torch.matmul(q_tile, kt[..., ks:ke].to(acc_dt))  # [B, Hkv, G*tq, tk]
        if kind is BlockKind.PARTIAL:
            vis = mask.visible(q_pos, k_pos_all[ks:ke], kl)  # [tq, tk] or [B, tq, tk]
            vis = vis[:, None, None] if vis.dim() == 3 else vis[None, None, None]
            s = s.view(B, Hkv, G, tq, ke - ks).masked_fill(~vis, float("-inf")).view_as(s)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        # A row with nothing visible so far keeps m = -inf; shift by 0 so exp() gives 0, not NaN.
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe)
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + torch.matmul(p, vg[:, :, ks:ke].to(acc_dt))
        m = m_new
    return acc, m, l


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *,
                    q_offset: int = 0, scale: Optional[float] = None, return_lse: bool = False,
                    out: Optional[torch.Tensor] = None, block_q: Optional[int] = None,
                    block_k: Optional[int] = None, stats: Optional[BlockStats] = None):
    """Same contract as ``reference_attention``; ``out`` (``[B, Sq, Hq, D]``, may be a view) receives the result."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    block_q = block_q or DEFAULT_BLOCK_Q
    block_k = block_k or DEFAULT_BLOCK_K
    acc_dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if out is None:
        out = torch.empty_like(q)
    lse_all = torch.empty(B, Hq, Sq, dtype=acc_dt, device=q.device) if return_lse else None

    # [B, Hkv, G, S, D] for queries, [B, Hkv, S, D] for keys/values: one matmul serves a whole GQA group.
    # Keys and values are converted to the accumulation dtype one block at a time (a long bf16 cache would
    # otherwise be copied whole).
    qg = q.to(acc_dt).view(B, Sq, Hkv, G, D).permute(0, 2, 3, 1, 4)
    kt = k.permute(0, 2, 3, 1)  # [B, Hkv, D, Sk]
    vg = v.permute(0, 2, 1, 3)  # [B, Hkv, Sk, D]
    kl = mask.key_lengths
    len_min = len_max = None
    if kl is not None:
        len_min, len_max = int(kl.min()), int(kl.max())  # read once: no sync inside the loops
        kl = kl.to(q.device)
    k_pos_all = torch.arange(Sk, device=q.device)

    for qs in range(0, Sq, block_q):
        qe = min(qs + block_q, Sq)
        tq = qe - qs
        q_tile = qg[:, :, :, qs:qe].reshape(B, Hkv, G * tq, D) * scale
        q_pos = torch.arange(qs, qe, device=q.device) + q_offset
        acc, m, l = _query_tile(q_tile, kt, vg, mask, q_offset + qs, q_pos, k_pos_all, kl, len_min, len_max, block_k,
                                stats)
        res = acc / torch.where(l == 0, torch.ones_like(l), l)
        out[:, qs:qe] = res.view(B, Hkv, G, tq, D).permute(0, 3, 1, 2, 4).reshape(B, tq, Hq, D).to(out.dtype)
        if lse_all is not None:
            lse = torch.where(l == 0, torch.full_like(l, float("-inf")), m + torch.log(l))
            lse_all[:, :, qs:qe] = lse.view(B, Hkv, G, tq).reshape(B, Hq, tq)
    if return_lse:
        return out, lse_all
    return out
