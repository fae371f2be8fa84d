"""The fallback GPU backend: PyTorch's scaled_dot_product_attention, memory-efficient kernel.

For GPUs where the Triton kernel does not run (compute capability < 8.0). Masks SDPA cannot
express natively (causal with ``q_offset``, windows, key lengths) become a boolean ``[Sq, Sk]``
(or ``[B, Sq, Sk]``) mask built per call for the needed region only: O(Sq x Sk) memory, which is
why this is the fallback and not the main path. GQA repeats K/V (the efficient kernel takes no
grouped heads). Calls that want an LSE go to the torch kernel (attention/select.py): SDPA's public API
returns none.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..masks import Mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *, q_offset: int = 0,
                   scale: Optional[float] = None, out: Optional[torch.Tensor] = None):
    """Same contract as ``tiled_attention`` without the LSE."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=2)
        v = v.repeat_interleave(Hq // Hkv, dim=2)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn_mask, is_causal, vis = None, False, None
    plain_causal = mask.causal and mask.window is None and q_offset == 0 and Sq == Sk
    if mask.key_lengths is None and plain_causal:
        is_causal = True
    elif mask.causal or mask.key_lengths is not None:
        q_pos = torch.arange(Sq, device=q.device) + q_offset
        vis = mask.visible(q_pos, torch.arange(Sk, device=q.device), mask.key_lengths)
        attn_mask = vis[:, None] if vis.dim() == 3 else vis  # [B, 1, Sq, Sk] or [Sq, Sk]
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    o = o.transpose(1, 2)
    if vis is not None:  # rows that see no key: 0, as in the other backends (SDPA may give NaN there)
        seen = vis.any(-1)  # [Sq] or [B, Sq]
        seen = seen[None, :, None, None] if seen.dim() == 1 else seen[:, :, None, None]
        o = torch.where(seen, o, torch.zeros((), dtype=o.dtype, device=o.device))
    if out is None:
        return o.contiguous()
    out.copy_(o)
    return out
