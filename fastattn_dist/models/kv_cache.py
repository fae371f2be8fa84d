"""The KV cache of a TP decoder: per layer ``[batch, max_seq_len, local_kv_heads, head_dim]`` keys and values.

Preallocated once per (batch, max_seq_len); ``lengths`` (int64, on the cache's device) counts the tokens
each sequence holds, so decode steps append at a per-sequence position without a host sync (CUDA-graph
safe). Prefill writes a block of positions for every sequence at once.

``Int8KVCache`` (``kv_dtype="int8"`` on the model) holds int8 keys and values with per-token scales
(attention/int8_kv.py): (D + 4) / (2 D) of the 16-bit cache's bytes (0.52 at head_dim 128), so a decode step
reads about half, and the same memory holds about twice the tokens.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..attention.decode import decode_attention, quantized_decode_attention
from ..attention.int8_kv import Int8KV
from ..kv import Int8LayerKV, LayerKV

KV_DTYPES = (None, "int8")  # the model's dtype, or int8 with per-token scales


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_seq_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, max_seq_len, kv_heads, head_dim)
        self.k: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self.batch, self.max_seq_len = batch, max_seq_len
        self._rows = torch.arange(batch, device=device)

    @classmethod
    def empty(cls, num_layers: int, batch: int, max_seq_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> "KVCache":
        """Per-layer (uninitialised) buffers: scratch for a cache-less forward whose layers overlap (each position
        is written before it is read)."""
        c = cls(0, batch, max_seq_len, kv_heads, head_dim, dtype, device)
        shape = (batch, max_seq_len, kv_heads, head_dim)
        c.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        c.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return c

    @classmethod
    def shared_layers(cls, num_layers: int, batch: int, max_seq_len: int, kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> "KVCache":
        """One layer's (uninitialised) buffers behind every layer: scratch for a cache-less forward, where
        layer i's keys are written before they are read and are not needed once layer i is done."""
        c = cls(0, batch, max_seq_len, kv_heads, head_dim, dtype, device)
        shape = (batch, max_seq_len, kv_heads, head_dim)
        k, v = torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)
        c.k, c.v = [k] * num_layers, [v] * num_layers
        return c

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self) -> None:
        self.lengths.zero_()

    def layer(self, i: int) -> LayerKV:
        """Layer i's buffers as the attention sublayer's KV sink (prefill tiles write and attend through it)."""
        return LayerKV(self.k[i], self.v[i])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One new token per sequence (``[batch, 1, kv_heads, head_dim]``) at each sequence's own length."""
        self.k[layer].index_put_((self._rows, self.lengths), k[:, 0])
        self.v[layer].index_put_((self._rows, self.lengths), v[:, 0])

    def attend(self, layer: int, q: torch.Tensor, kv_len: torch.Tensor, window: Optional[int], backend: str):
        """Decode attention of ``q`` ``[B, 1, Hq, D]`` against layer ``layer``'s first ``kv_len`` keys per sequence."""
        return decode_attention(q, self.k[layer], self.v[layer], kv_len, window=window, backend=backend)


class Int8KVCache(KVCache):
    """The cache in int8 (module docstring): ``q8[i]`` is layer i's ``Int8KV``; ``k``/``v`` its int8 tensors.
    Attention reads it dequantized to ``dtype`` (prefill tiles) or as int8 (the decode kernel)."""

    def __init__(self, num_layers: int, batch: int, max_seq_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(0, batch, max_seq_len, kv_heads, head_dim, dtype, device)
        self.dtype = dtype
        self.q8 = [Int8KV.zeros(batch, max_seq_len, kv_heads, head_dim, device) for _ in range(num_layers)]
        self.k, self.v = [t.k for t in self.q8], [t.v for t in self.q8]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int) -> int:
        return num_layers * Int8KV.bytes_per_token(kv_heads, head_dim)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.q8)

    def reset(self) -> None:
        super().reset()
        for t in self.q8:
            t.reset()

    def layer(self, i: int) -> Int8LayerKV:
        return Int8LayerKV(self.q8[i], self.dtype)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.q8[layer].append(self._rows, self.lengths, k, v)

    def attend(self, layer: int, q: torch.Tensor, kv_len: torch.Tensor, window: Optional[int], backend: str):
        return quantized_decode_attention(q, self.q8[layer], kv_len, window=window, backend=backend)
