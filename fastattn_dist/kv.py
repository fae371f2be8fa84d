"""Where an attention sublayer keeps its keys and values: one layer's buffers, written tile by tile and attended.

A prefill tile of the attention sublayer (the block's ``forward`` or a model layer) writes its rows' K/V at their
positions and attends its queries to every key up to its last row (causal: earlier tiles wrote the rest). The
sublayer never knows where the keys live nor which kernel runs: a ``KVSink`` does both. ``LayerKV`` keeps them
in one ``[batch, capacity, kv_heads, head_dim]`` pair of buffers (the block's scratch, a layer of the model's
KV cache); ``Int8LayerKV`` is a layer of the int8 cache (attention/int8_kv.py: written quantized, attended
dequantized); the model's two-tier cache has its own sink (models/kv_offload.py).

``QuantizedLayerKV`` attends through the 8-bit attention kernels (``precision`` "int8", "fp8", "int8-fp8")
over the keys another sink holds. The kernels' K/V format needs statistics over keys (K smoothing: the
per-channel mean; V: the per-channel max), so a key's 8-bit form depends on the keys it is quantized with:

* ``complete=True`` (the block: every key of the call is projected before the first tile): K/V are quantized
  once, over all keys, as the method (SageAttention's mean over all tokens, INT-FlashAttention's V scale) has
  it, and every tile reads that one quantization: a row's attention is the same in any tiling.
* otherwise (the model's prefill: a tile's keys exist only once the tile before it has run through the layers
  below): each attention call quantizes the keys [0, key_end) it needs, once, with statistics over them. Every
  tile reads 8-bit keys and is exact in its own softmax (any mean subtracted from all of a row's keys leaves it
  unchanged, and the LSE gets q . mean back), but tile i's keys are quantized with tile i's statistics, so a
  different tiling rounds differently (at the int8 error's scale), and the keys of earlier tiles are quantized
  again (about (tiles + 1) / 2 quantization passes over K/V instead of one: small beside the attention it feeds
  at long contexts). Fixing the statistics at the first tile instead would save those passes but cannot bound V:
  a later token above the first tile's V maximum would saturate.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from .attention import attend_quantized, kernel_for, quantize_kv_for, quantized_kernel_for, run_kernel
from .attention.int8_kv import Int8KV
from .attention.quantized import batch_slice
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
        self.batch, self.capacity, self.device = k.shape[0], k.shape[1], k.device

    @classmethod
    def empty(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device) -> "LayerKV":
        shape = (batch, capacity, kv_heads, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def write(self, b0: int, b1: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        self.k[b0:b1, start:start + n] = k
        self.v[b0:b1, start:start + n] = v

    def rows(self, b0: int, b1: int, key_end: int):
        """Keys and values of positions [0, key_end) of sequences b0..b1-1 (views)."""
        return self.k[b0:b1, :key_end], self.v[b0:b1, :key_end]

    def attend(self, q: torch.Tensor, b0: int, b1: int, q_offset: int, key_end: int, mask: Mask, backend: str,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``q`` of sequences b0..b1-1 at positions q_offset.. against keys [0, key_end) (written before)."""
        kl = mask.key_lengths
        if kl is not None and key_end < self.capacity:
            mask = Mask(mask.causal, mask.window, kl.clamp(max=key_end))
        keys, vals = self.rows(b0, b1, key_end)
        which = kernel_for(backend, q, keys, mask, q_offset, False)
        return run_kernel(which, q, keys, vals, mask, q_offset=q_offset, out=out)

    def attend_written(self, q, k, v, b0, b1, start, mask, backend, out=None):
        return self.attend(q, b0, b1, start, start + q.shape[1], mask, backend, out)


class Int8LayerKV(LayerKV):
    """A layer of the int8 KV cache (``Int8KV``): writes quantize (per token; keys smoothed by each sequence's mean,
    fixed at its first write), attention reads the keys dequantized to ``dtype`` through the 16-bit kernels."""

    def __init__(self, q8: Int8KV, dtype: torch.dtype) -> None:  # no 16-bit buffers of its own
        self.q8, self.dtype = q8, dtype
        self.batch, self.capacity, self.device = q8.k.shape[0], q8.k.shape[1], q8.k.device

    def write(self, b0: int, b1: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.q8.write(b0, b1, start, k, v)

    def rows(self, b0: int, b1: int, key_end: int):
        return self.q8.rows(b0, b1, key_end, self.dtype)


class QuantizedLayerKV:
    """A KV sink whose attention runs the 8-bit kernels at ``precision`` over the keys ``source`` holds (a
    ``LayerKV``); ``complete``: ``source`` holds every key of the call already (the module docstring), whose key
    lengths are ``key_lengths``: they are quantized here, for ``backend``'s kernel, on the current stream, before
    tiles on other CUDA streams read them (the block forks its tile streams after this)."""

    def __init__(self, source: LayerKV, precision: str, *, complete: bool = False,
                 key_lengths: Optional[torch.Tensor] = None, backend: str = "auto") -> None:
        self.source, self.precision, self.complete, self.key_lengths = source, precision, complete, key_lengths
        self._cached = None  # (what was quantized, its QuantizedKV): valid until the next write
        if complete:
            which = quantized_kernel_for(backend, source.device, precision)
            self._quantized(which, 0, source.batch, source.capacity, None)

    def write(self, b0: int, b1: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.complete:
            raise ValueError("a complete QuantizedLayerKV holds every key of the call already: nothing to write")
        self.source.write(b0, b1, start, k, v)
        self._cached = None

    def _quantized(self, which: str, b0: int, b1: int, key_end: int, mask: Mask):
        if self.complete:  # every sequence, every key, once; a tile's sequences are a slice of it
            key, lo, hi, end, kl = (which,), 0, self.source.batch, self.source.capacity, self.key_lengths
        else:
            key, lo, hi, end, kl = (which, b0, b1, key_end), b0, b1, key_end, mask.key_lengths
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # free the old one first
            k, v = self.source.rows(lo, hi, end)
            self._cached = (key, quantize_kv_for(which, k, v, self.precision, kl))
        kv = self._cached[1]
        return batch_slice(kv, b0, b1) if self.complete else kv

    def attend(self, q: torch.Tensor, b0: int, b1: int, q_offset: int, key_end: int, mask: Mask, backend: str,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As ``LayerKV.attend``; a complete sink attends to all its keys (a causal mask hides those after a row)."""
        which = quantized_kernel_for(backend, q.device, self.precision)
        kv = self._quantized(which, b0, b1, key_end, mask)
        return attend_quantized(which, q, kv, mask, q_offset=q_offset, out=out)

    def attend_written(self, q, k, v, b0, b1, start, mask, backend, out=None):
        return self.attend(q, b0, b1, start, start + q.shape[1], mask, backend, out)
