"""The unsharded block on one device, in float64, written from the formulas: what TP runs are checked against.

Independent of the implementation on purpose: it has its own RoPE (float64 angles), its own reading of
the mask (three facts: causal, window, key lengths) and plain softmax attention, and imports nothing of
the package. Attention runs over chunks of query rows, so memory is O(chunk x keys) per head and the
check works at any length the block runs.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

CHUNK = 256


def rope64(x: torch.Tensor, theta: float, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate-half RoPE in float64: pairs (i, i + D/2) turned by angle p * theta^(-2i/D). ``x``: [B, S, H, D]."""
    B, S, H, D = x.shape
    half = D // 2
    pos = torch.arange(S, dtype=torch.float64) if positions is None else positions.to(torch.float64).cpu()
    freq = torch.tensor([theta ** (-2.0 * i / D) for i in range(half)], dtype=torch.float64)
    ang = pos[:, None] * freq[None, :]                      # [S, D/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x = x.double()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def _mask_facts(mask):
    """(causal, window, key_lengths) of a mask object or of "causal" / "none"."""
    if mask is None or mask == "none":
        return False, None, None
    if mask == "causal":
        return True, None, None
    return bool(mask.causal), mask.window, mask.key_lengths


def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask="causal", q_offset: int = 0,
                scale: Optional[float] = None, return_lse: bool = False, chunk: int = CHUNK,
                progress: Optional[Callable[[int], None]] = None):
    """Standard attention in float64. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (query head h reads kv head
    h // (Hq / Hkv)); query row i sits at position q_offset + i. Rows that see no key give 0 (lse -inf).
    ``progress(rows)`` is called after each chunk with the number of query rows it finished."""
    causal, window, key_lengths = _mask_facts(mask)
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd = q.double().cpu().permute(0, 2, 1, 3)                                     # [B, Hq, Sq, D]
    kd = k.double().cpu().repeat_interleave(Hq // Hkv, dim=2).permute(0, 2, 1, 3)  # [B, Hq, Sk, D]
    vd = v.double().cpu().repeat_interleave(Hq // Hkv, dim=2).permute(0, 2, 1, 3)
    kpos = torch.arange(Sk)
    lens = None if key_lengths is None else key_lengths.cpu().to(torch.int64)
    out = torch.zeros(B, Hq, Sq, D, dtype=torch.float64)
    lse_all = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float64)
    for c0 in range(0, Sq, chunk):
        c1 = min(Sq, c0 + chunk)
        qpos = torch.arange(c0, c1) + q_offset
        keep = torch.ones(c1 - c0, Sk, dtype=torch.bool)
        if causal:
            keep &= kpos[None, :] <= qpos[:, None]
            if window is not None:
                keep &= kpos[None, :] > qpos[:, None] - window
        keep = keep[None, None].expand(B, 1, -1, -1)
        if lens is not None:
            keep = keep & (kpos[None, None, None, :] < lens[:, None, None, None])
        s = (qd[:, :, c0:c1] @ kd.transpose(-1, -2)) * scale
        s = s.masked_fill(~keep, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        z = p.sum(-1, keepdim=True)
        out[:, :, c0:c1] = torch.where(z > 0, (p @ vd) / z.clamp_min(1e-300), torch.zeros_like(qd[:, :, c0:c1]))
        lse_all[:, :, c0:c1] = torch.where(z[..., 0] > 0, m[..., 0] + torch.log(z[..., 0].clamp_min(1e-300)),
                                           torch.full_like(z[..., 0], float("-inf")))
        if progress is not None:
            progress(c1 - c0)
    out = out.permute(0, 2, 1, 3)
    return (out, lse_all) if return_lse else out


def reference_block(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
                    num_heads: int, num_kv_heads: int, mask="causal", rope_theta: Optional[float] = None,
                    chunk: int = CHUNK, progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """``x [B, S, hidden]`` and ``nn.Linear``-layout weights -> ``[B, S, hidden]`` in float64 on the CPU.
    The head size is ``wq``'s rows / ``num_heads`` (so one rank's shard of heads works too)."""
    B, S, H = x.shape
    D = wq.shape[0] // num_heads
    x64 = x.double().cpu()
    q = (x64 @ wq.double().cpu().t()).view(B, S, num_heads, D)
    k = (x64 @ wk.double().cpu().t()).view(B, S, num_kv_heads, D)
    v = (x64 @ wv.double().cpu().t()).view(B, S, num_kv_heads, D)
    if rope_theta is not None:
        q, k = rope64(q, rope_theta), rope64(k, rope_theta)
    o = attention64(q, k, v, mask, chunk=chunk, progress=progress)
    return o.reshape(B, S, num_heads * D) @ wo.double().cpu().t()
