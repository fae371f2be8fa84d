"""Tensor-parallel shapes: what one rank holds of a model's dimensions (Megatron style, heads split across ranks).

q/k/v and the MLP's gate/up are column-parallel (each rank holds the rows of its heads, of its slice of the
intermediate size), o_proj and the MLP's down projection row-parallel (the matching columns), and the
vocabulary is split in contiguous slices (the last rank's tail padded). ``TPShape`` is the one shard-shape
type of the block and the model: it checks divisibility once, with clear errors, on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class TPShape:
    """A block's or a model's shape, and the slice of it rank ``rank`` of ``world_size`` holds.

    ``head_dim`` defaults to hidden_size / num_heads; ``intermediate_size`` and ``vocab_size`` are 0 for an
    attention block alone."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    world_size: int
    rank: int
    head_dim: int
    intermediate_size: int = 0
    vocab_size: int = 0

    @classmethod
    def checked(cls, hidden_size, num_heads, num_kv_heads, world_size: int, rank: int, *,
                head_dim: Optional[int] = None, intermediate_size: int = 0, vocab_size: int = 0) -> "TPShape":
        _check_int("hidden_size", hidden_size)
        _check_int("num_heads", num_heads)
        _check_int("num_kv_heads", num_kv_heads)
        _check_int("intermediate_size", intermediate_size, 0)
        _check_int("vocab_size", vocab_size, 0)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
            head_dim = hidden_size // num_heads
        _check_int("head_dim", head_dim)
        if num_heads % world_size:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by the world size ({world_size})")
        if num_kv_heads % world_size:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must be divisible by the world size ({world_size}); "
                             "use a world size that divides the kv heads")
        if intermediate_size % world_size:
            raise ValueError(f"intermediate_size ({intermediate_size}) must be divisible by the world size "
                             f"({world_size})")
        return cls(hidden_size, num_heads, num_kv_heads, world_size, rank, head_dim, intermediate_size, vocab_size)

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world_size

    @property
    def local_kv_heads(self) -> int:
        return self.num_kv_heads // self.world_size

    @property
    def local_intermediate(self) -> int:
        return self.intermediate_size // self.world_size

    @property
    def local_vocab(self) -> int:
        """Vocabulary rows per rank (the last rank's tail beyond ``vocab_size`` is zero padding)."""
        return -(-self.vocab_size // self.world_size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.local_vocab

    @property
    def q_rows(self) -> slice:
        n = self.local_heads * self.head_dim
        return slice(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_rows(self) -> slice:
        n = self.local_kv_heads * self.head_dim
        return slice(self.rank * n, (self.rank + 1) * n)

    @property
    def intermediate_rows(self) -> slice:
        n = self.local_intermediate
        return slice(self.rank * n, (self.rank + 1) * n)

    @property
    def qkv_split(self):
        """The sizes of this rank's q, k and v in the fused q/k/v projection's output."""
        D = self.head_dim
        return [self.local_heads * D, self.local_kv_heads * D, self.local_kv_heads * D]

    def full_weight_shapes(self) -> dict:
        D = self.head_dim
        return {"wq": (self.num_heads * D, self.hidden_size), "wk": (self.num_kv_heads * D, self.hidden_size),
                "wv": (self.num_kv_heads * D, self.hidden_size), "wo": (self.hidden_size, self.num_heads * D)}


def shard_full_weights(shape: TPShape, wq, wk, wv, wo) -> dict:
    """Check the unsharded ``nn.Linear``-layout weights and return this rank's shards: ``qkv`` (q, k and v rows
    stacked, the fused projection's layout) and ``wo`` (o_proj's columns)."""
    given = {"wq": wq, "wk": wk, "wv": wv, "wo": wo}
    for name, w in list(given.items()):
        if isinstance(w, torch.nn.Linear):
            w = w.weight
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or nn.Linear, got {type(w).__name__}")
        if tuple(w.shape) != shape.full_weight_shapes()[name]:
            raise ValueError(f"{name} must have shape {list(shape.full_weight_shapes()[name])} "
                             f"(nn.Linear layout [out, in]), got {list(w.shape)}")
        given[name] = w.detach()
    qkv = torch.cat([given["wq"][shape.q_rows], given["wk"][shape.kv_rows], given["wv"][shape.kv_rows]])
    return {"qkv": qkv, "wo": given["wo"][:, shape.q_rows]}
