"""Rotary position embeddings, rotate-half form (the Llama / Hugging Face convention).

For a head vector x of even size D and position p, with frequencies f_i = theta^(-2i/D), i < D/2:

    out[i]       = x[i] cos(p f_i) - x[i + D/2] sin(p f_i)
    out[i + D/2] = x[i + D/2] cos(p f_i) + x[i] sin(p f_i)

(pairs are (i, i + D/2), not adjacent elements). ``rope_scaling`` rescales the frequencies as the
checkpoint asks: "linear" divides every frequency by ``factor``; "llama3" divides the low ones by
``factor``, keeps the high ones and blends in between (Llama 3.1). Angles are computed in float32
(float64 for float64 inputs) and the rotation in that precision, then cast back.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

SCALINGS = ("linear", "llama3")


def check_scaling(scaling: Optional[dict]) -> Optional[dict]:
    """None, or a ``rope_scaling`` dict of a kind we support (its name in the error otherwise)."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in SCALINGS:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SCALINGS)}")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise ValueError(f"rope_scaling factor must be a number > 0, got {factor!r}")
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if not isinstance(scaling.get(key), (int, float)) or not scaling[key] > 0:
                raise ValueError(f"llama3 rope_scaling needs a positive {key}, got {scaling.get(key)!r}")
        if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
            raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")
    return dict(scaling, rope_type=kind)


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[dict] = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The D/2 frequencies f_i, after ``scaling``."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype) / head_dim))
    scaling = check_scaling(scaling)
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class Rotary:
    """RoPE for one head size; cos/sin tables are built once per device and grown as positions require."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict] = None) -> None:
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim!r}")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
            raise ValueError(f"rope_theta must be a finite number > 0, got {theta!r}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.scaling = check_scaling(scaling)
        self._tables: dict = {}

    def tables(self, n: int, device: torch.device, dtype: torch.dtype):
        """cos, sin ``[n', D]`` for positions 0..n'-1 (n' >= n) in ``dtype`` (float32 or float64)."""
        key = (str(device), dtype)
        t = self._tables.get(key)
        if t is None or t[0].shape[0] < n:
            size = max(n, 2 * t[0].shape[0] if t is not None else 256)
            inv = inverse_frequencies(self.head_dim, self.theta, self.scaling, dtype)
            ang = torch.outer(torch.arange(size, dtype=dtype), inv)
            ang = torch.cat([ang, ang], -1)
            t = (ang.cos().to(device), ang.sin().to(device))
            self._tables[key] = t
        return t

    def apply(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` ``[B, S, H, D]``; ``positions`` ``[S]`` or ``[B, S]`` int64 (default 0..S-1)."""
        B, S, _, D = x.shape
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        if positions is None:
            cos, sin = self.tables(S, x.device, cdt)
            cos, sin = cos[:S][None, :, None, :], sin[:S][None, :, None, :]
        else:
            # positions on a GPU are not read back (no sync): ``reserve`` must have built tables covering them
            if positions.device.type != "cpu" and self._reserved == 0:
                raise ValueError("rotary positions on a GPU need reserve(max_position) first (they are not read back)")
            need = int(positions.max()) + 1 if positions.device.type == "cpu" else self._reserved
            cos, sin = self.tables(need, x.device, cdt)
            idx = positions.to(x.device)
            cos, sin = cos[idx], sin[idx]
            if idx.dim() == 1:
                cos, sin = cos[None, :, None, :], sin[None, :, None, :]
            else:
                cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        xf = x.to(cdt)
        rotated = torch.cat([-xf[..., D // 2:], xf[..., : D // 2]], -1)
        return (xf * cos + rotated * sin).to(x.dtype)

    _reserved = 0

    def reserve(self, n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Build the tables for positions < n now (decode passes device-side positions and never syncs)."""
        self._reserved = max(self._reserved, n)
        self.tables(n, device, torch.float64 if dtype == torch.float64 else torch.float32)
