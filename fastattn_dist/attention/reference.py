"""Standard attention: full score matrix and an explicit mask, as in the paper's baseline.

Memory is O(Sq x Sk) per head: this is the correctness reference (run it in float64)
and the naive baseline, not something to use for long sequences.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..masks import Mask


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *,
                        q_offset: int = 0, scale: Optional[float] = None, return_lse: bool = False):
    """q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` -> out ``[B, Sq, Hq, D]`` (and lse ``[B, Hq, Sq]``).

    Computes in the inputs' dtype, except half types, which are computed in float32.
    Rows that see no key produce zeros and an lse of -inf.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    group = Hq // Hkv
    qh = q.to(cdt).permute(0, 2, 1, 3)  # [B, Hq, Sq, D]
    kh = k.to(cdt).repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    vh = v.to(cdt).repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, Hq, Sq, Sk]
    q_pos = torch.arange(Sq, device=q.device) + q_offset
    k_pos = torch.arange(Sk, device=q.device)
    vis = mask.visible(q_pos, k_pos)  # [Sq, Sk] or [B, Sq, Sk]
    vis = vis[:, None] if vis.dim() == 3 else vis[None, None]
    scores = scores.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Sq]
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.matmul(probs, vh).permute(0, 2, 1, 3).to(q.dtype)
    if return_lse:
        return out, lse
    return out
