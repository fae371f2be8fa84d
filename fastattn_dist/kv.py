"""Where an attention sublayer keeps its keys and values: one layer's buffers, written tile by tile and attended.

A prefill tile of the attention sublayer (the block's ``forward`` or a model layer) writes its rows' K/V at their
positions and attends its queries to every key up to its last row (causal: earlier tiles wrote the rest). The
sublayer never knows where the keys live nor which kernel runs: a ``KVSink`` does both. ``LayerKV`` keeps them
in one ``[batch, capacity, kv_heads, head_dim]`` pair of buffers (the block's scratch, a layer of the model's
KV cache); the model's two-tier cache has its own sink (models/kv_offload.py).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from .attention import kernel_for, run_kernel
from .masks import Mask


class KVSink(Protocol):
    def write(self, b0: int, b1: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ``[b1 - b0, n, kv_heads, D]`` at positions [start, start + n) of sequences b0..b1-1."""
        ...

    def attend_written(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b0: int, b1: int, start: int,
                       mask: Mask, backend: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend ``q`` (the rows whose ``k``, ``v`` were just written at ``start``..) to every key before and at
        them; ``mask``: the causal structure and the sequences' key lengths (already sliced to b0..b1)."""
        ...


class TileOrder:
    """Keeps a tile's attention after the earlier tiles' keys are written when tiles run on different CUDA streams
    (a tile reads the keys of every row before its own). ``written(i)``, on tile i's stream once its keys are
    stored: waits for tile i - 1's mark, then marks tile i, so each mark covers every earlier tile's keys. On CPU,
    or with one stream, the tiles' order is the program's and this does nothing."""

    def __init__(self, tiles: int, device: torch.device) -> None:
        self._events = [None] * tiles if device.type == "cuda" else None

    def written(self, i: int) -> None:
        if self._events is None:
            return
        if i > 0 and self._events[i - 1] is not None:
            torch.cuda.current_stream().wait_event(self._events[i - 1])
        ev = torch.cuda.Event()
        ev.record()
        self._events[i] = ev


class LayerKV:
    """One layer's keys and values ``[batch, capacity, kv_heads, head_dim]`` (views into a cache, or scratch)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    @classmethod
    def empty(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device) -> "LayerKV":
        shape = (batch, capacity, kv_heads, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def write(self, b0: int, b1: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        self.k[b0:b1, start:start + n] = k
        self.v[b0:b1, start:start + n] = v

    def attend(self, q: torch.Tensor, b0: int, b1: int, q_offset: int, key_end: int, mask: Mask, backend: str,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``q`` of sequences b0..b1-1 at positions q_offset.. against keys [0, key_end) (written before)."""
        kl = mask.key_lengths
        if kl is not None and key_end < self.k.shape[1]:
            mask = Mask(mask.causal, mask.window, kl.clamp(max=key_end))
        keys, vals = self.k[b0:b1, :key_end], self.v[b0:b1, :key_end]
        which = kernel_for(backend, q, keys, mask, q_offset, False)
        return run_kernel(which, q, keys, vals, mask, q_offset=q_offset, out=out)

    def attend_written(self, q, k, v, b0, b1, start, mask, backend, out=None):
        return self.attend(q, b0, b1, start, start + q.shape[1], mask, backend, out)
