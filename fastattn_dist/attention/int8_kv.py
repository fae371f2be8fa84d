"""The int8 KV cache's format: one layer's keys and values in int8, one fp32 scale per (token, kv head) for each.

Per token, because a cache grows a token at a time (a decode step appends one): a token's scales depend on that
token alone, so appending never touches what is stored (a per-head or per-block V scale would have to cover
tokens not seen yet). Keys are smoothed first (SageAttention): the per-channel mean ``k_mean`` of each (sequence,
kv head) is subtracted, so the channel offsets real keys have do not set every token's scale. The mean is fixed
at the sequence's first write after ``reset`` (the first prefill tile's keys of that sequence, ``fix_mean``) and
used for every later key, decode appends included. Which mean it is does not matter for exactness:
dequantization adds it back (``rows``), and a kernel that skips the add (triton_decode.py) shifts every score of
a row by the same q . mean, which softmax ignores and the LSE gets back; it matters for the rounding only (a
prefill with another first tile rounds its keys a little differently). Values need no smoothing (a per-token
scale has no channel offset to absorb).

Bytes per token and kv head: 2 (D + 4) against 4 D at 16 bits, 0.516x at head_dim 128.

Rounding as quantized.py's (round half to even of ``x * (127 * rcp(amax))``): the fused append kernel
(models/triton_fused.py) writes the same integers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .quantized import quantize_rows


def quantize_tokens(x: torch.Tensor, mean: Optional[torch.Tensor] = None):
    """``x`` [..., D] (any float dtype) minus ``mean`` (broadcast, fp32) -> (int8 [..., D], fp32 scale [...])."""
    xf = x.float() if mean is None else x.float() - mean
    return quantize_rows(xf, "int8")


def dequantize_tokens(x8: torch.Tensor, scale: torch.Tensor, mean: Optional[torch.Tensor], dtype) -> torch.Tensor:
    x = x8.float() * scale[..., None]
    return (x if mean is None else x + mean).to(dtype)


@dataclass
class Int8KV:
    """One layer: ``k``, ``v`` [B, L, Hkv, D] int8, ``k_scale``, ``v_scale`` [B, L, Hkv] fp32, ``k_mean``
    [B, Hkv, D] fp32; ``mean_fixed``: per sequence, whether its mean is set (host side; ``reset`` clears it)."""

    k: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor
    mean_fixed: List[bool] = field(default_factory=list)
    mean_written: Optional[object] = None  # CUDA: an event after the mean's write (tiles on other streams wait)

    @classmethod
    def zeros(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, device) -> "Int8KV":
        shape = (batch, capacity, kv_heads, head_dim)
        z8 = lambda: torch.zeros(shape, dtype=torch.int8, device=device)  # noqa: E731
        zs = lambda: torch.zeros(shape[:3], dtype=torch.float32, device=device)  # noqa: E731
        return cls(z8(), zs(), torch.zeros(batch, kv_heads, head_dim, device=device), z8(), zs(), [False] * batch)

    @staticmethod
    def bytes_per_token(kv_heads: int, head_dim: int) -> int:
        return 2 * kv_heads * (head_dim + 4)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.k_scale, self.k_mean, self.v, self.v_scale))

    def reset(self) -> None:
        self.mean_fixed = [False] * self.k.shape[0]
        self.mean_written = None

    def fix_mean(self, b0: int, b1: int, k: torch.Tensor) -> None:
        """Sequences b0..b1-1 without a mean take the mean of ``k`` [b1 - b0, n, Hkv, D] over its tokens."""
        if self.mean_written is not None:  # a wavefront prefill writes tiles on several streams: the means first
            torch.cuda.current_stream().wait_event(self.mean_written)
        todo = [b for b in range(b0, b1) if not self.mean_fixed[b]]
        if todo:
            idx = torch.tensor([b - b0 for b in todo], device=k.device)
            self.k_mean[todo] = k.index_select(0, idx).float().mean(1)
            for b in todo:
                self.mean_fixed[b] = True
            if k.is_cuda:
                self.mean_written = torch.cuda.Event()
                self.mean_written.record()

    def write(self, b0: int, b1: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k``, ``v`` [b1 - b0, n, Hkv, D] at positions [start, start + n) of sequences b0..b1-1."""
        self.fix_mean(b0, b1, k)
        n = k.shape[1]
        k8, ks = quantize_tokens(k, self.k_mean[b0:b1, None])
        v8, vs = quantize_tokens(v)
        self.k[b0:b1, start:start + n], self.k_scale[b0:b1, start:start + n] = k8, ks
        self.v[b0:b1, start:start + n], self.v_scale[b0:b1, start:start + n] = v8, vs

    def append(self, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """One new token per sequence (``k``, ``v`` [B, 1, Hkv, D]) at ``positions`` [B] (on the device, no sync)."""
        k8, ks = quantize_tokens(k[:, 0], self.k_mean)
        v8, vs = quantize_tokens(v[:, 0])
        for dst, src in ((self.k, k8), (self.k_scale, ks), (self.v, v8), (self.v_scale, vs)):
            dst.index_put_((rows, positions), src)

    def rows(self, b0: int, b1: int, key_end: int, dtype) -> tuple:
        """Keys and values of positions [0, key_end) of sequences b0..b1-1, dequantized to ``dtype``."""
        k = dequantize_tokens(self.k[b0:b1, :key_end], self.k_scale[b0:b1, :key_end], self.k_mean[b0:b1, None], dtype)
        v = dequantize_tokens(self.v[b0:b1, :key_end], self.v_scale[b0:b1, :key_end], None, dtype)
        return k, v
