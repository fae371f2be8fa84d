"""The unsharded block on one device, in float64: what every TP run is checked against.

Independent of the tiled code: standard attention with the mask materialised, full weights,
no tiles, no communication.
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention.reference import reference_attention
from .masks import MaskLike, resolve_mask


def reference_block(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
                    num_heads: int, num_kv_heads: int, mask: MaskLike = "causal",
                    rope_theta: Optional[float] = None) -> torch.Tensor:
    """``x [B, S, hidden]`` and ``nn.Linear``-layout weights -> ``[B, S, hidden]`` in float64."""
    from .block import rope  # the same formula as the block; it is checked on its own in the tests

    B, S, H = x.shape
    D = H // num_heads
    x64 = x.double()
    q = (x64 @ wq.double().t()).view(B, S, num_heads, D)
    k = (x64 @ wk.double().t()).view(B, S, num_kv_heads, D)
    v = (x64 @ wv.double().t()).view(B, S, num_kv_heads, D)
    if rope_theta is not None:
        q, k = rope(q, rope_theta), rope(k, rope_theta)
    o = reference_attention(q, k, v, resolve_mask(mask))
    return o.reshape(B, S, num_heads * D) @ wo.double().t()
