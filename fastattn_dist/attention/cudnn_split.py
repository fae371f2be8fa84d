"""Tiles of query rows through cuDNN's fused attention (Hopper), merged by log-sum-exp.

On H100/H200 cuDNN's attention (what PyTorch's SDPA dispatches to there) is 15-25% faster than our
Triton kernel (docs/attention_kernel.md), but it only knows whole sequences: no mask, or a causal
mask aligned at the top-left corner. A causal tile of query rows [r0, r1) is cut into what it can do:

    prefix    rows [r0, r1) x keys [0, r0)    no mask: every row sees all of these keys
    diagonal  rows [r0, r1) x keys [r0, r1)   causal, top-left aligned: row r0 + i sees r0 .. r0 + i

each one cuDNN call that also returns its log-sum-exp, and one merge pass writes the exact softmax
mix into ``out`` (a slice of the o_proj input buffer): ``out = o_d + sigmoid(lse_p - lse_d) (o_p - o_d)``.
The first tile (r0 = 0) and unmasked calls are a single cuDNN call and a copy.

``supports`` says which calls cuDNN can take whole; the rest go to the Triton kernel (attention/select.py). A call
that wants the LSE too is taken when it is one cuDNN call (no merge): every key visible, or the diagonal alone.
With no ``out``, a single-call tile returns cuDNN's own output (token-major, so the o_proj GEMM reads it
as it is: no copy). The merge and the cut are plain code, tested on CPU with any attention in place of
cuDNN (``attend=``); cuDNN itself is checked in tests/gpu.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from ..masks import Mask

# (q, k, v [B, S, H, D] views, causal, scale, want_lse) -> (o [B, Sq, H, D], lse [B, H, Sq] fp32 natural log,
# or None when not wanted)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float, bool],
                  Tuple[torch.Tensor, Optional[torch.Tensor]]]


def single_call(k: torch.Tensor, mask: Mask, q_offset: int) -> Optional[bool]:
    """The causal flag of the one cuDNN call that computes this attention whole, or None when it needs the cut:
    False when every row sees every key (no mask, or all keys before the first row), True for the diagonal alone
    (queries from position 0, causal, top-left aligned)."""
    if not mask.causal or q_offset >= k.shape[1] - 1:
        return False
    return True if q_offset == 0 else None


def supports(q: torch.Tensor, k: torch.Tensor, mask: Mask, q_offset: int, return_lse: bool) -> bool:
    """Whether a call can go to cuDNN whole (the rest goes to the Triton kernel)."""
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[2] % k.shape[2]:
        return False
    if q.shape[3] not in (64, 128) or mask.key_lengths is not None or mask.window is not None:
        return False
    if return_lse and single_call(k, mask, q_offset) is None:
        return False  # a cut call's LSE would need the merge to return one too
    # causal: the rows' own keys must exist (rows [q_offset, q_offset + Sq) see keys up to their own), unless
    # every key lies before the first row
    return not mask.causal or q_offset + q.shape[1] <= k.shape[1] or q_offset >= k.shape[1] - 1


def cudnn_attend(q, k, v, causal: bool, scale: float, want_lse: bool):
    """One cuDNN call on [B, S, H, D] views; its output stays in cuDNN's [B, H, Sq, D] memory. The LSE
    is computed only when a merge needs it (single-call tiles skip writing it). GQA: the call gets K/V
    with each kv head repeated for its query heads (a copy of the keys it reads, small beside the call)."""
    if k.shape[2] != q.shape[2]:
        g = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, want_lse, 0.0, causal, False, scale=scale)
    lse = res[1].reshape(q.shape[0], q.shape[2], q.shape[1]) if want_lse else None
    return res[0].transpose(1, 2), lse


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *, q_offset: int = 0,
                    scale: Optional[float] = None, out: Optional[torch.Tensor] = None, return_lse: bool = False,
                    attend: Attend = cudnn_attend):
    """Same contract as ``tiled_attention`` for the calls ``supports`` accepts (the LSE for single calls only);
    with ``out=None`` a single-call tile returns cuDNN's output itself."""
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    Sq = q.shape[1]
    if return_lse:
        causal = single_call(k, mask, q_offset)
        o, lse = attend(q, k, v, causal, scale, True)
        return (o if out is None else out.copy_(o)), lse
    if single_call(k, mask, q_offset) is False:
        o, _ = attend(q, k, v, False, scale, False)
        return o if out is None else out.copy_(o)
    r0, r1 = q_offset, q_offset + Sq
    o_d, lse_d = attend(q, k[:, r0:r1], v[:, r0:r1], True, scale, r0 > 0)
    if r0 == 0:
        return o_d if out is None else out.copy_(o_d)
    o_p, lse_p = attend(q, k[:, :r0], v[:, :r0], False, scale, True)
    return merge(torch.empty_like(q) if out is None else out, o_p, lse_p, o_d, lse_d)


def merge(out: torch.Tensor, o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
          lse_b: torch.Tensor) -> torch.Tensor:
    """``out`` = softmax-weighted mix of two partial results over disjoint keys ([B, S, H, D], lse [B, H, S])."""
    if out.is_cuda:  # one pass; the torch lines below are the same formula in four passes
        from .triton_fa import merge_partials
        return merge_partials(out, o_a, lse_a, o_b, lse_b)
    cdt = torch.promote_types(out.dtype, torch.float32)
    w = torch.sigmoid(lse_a.to(cdt) - lse_b.to(cdt)).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    return out.copy_(torch.lerp(o_b.to(cdt), o_a.to(cdt), w))

