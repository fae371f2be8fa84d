"""Tensor-parallel shapes and weight shards (Megatron style, heads split across ranks).

QKV are column-parallel (each rank holds the rows of its heads), O is row-parallel (each rank
holds the columns of its heads); the block's output is the sum over ranks of o_proj partials.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class TPShape:
    """The attention block's shape, and the slice of it one rank holds."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    world_size: int
    rank: int

    @classmethod
    def checked(cls, hidden_size, num_heads, num_kv_heads, world_size: int, rank: int) -> "TPShape":
        _check_int("hidden_size", hidden_size)
        _check_int("num_heads", num_heads)
        _check_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if num_heads % world_size:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by the world size ({world_size})")
        if num_kv_heads % world_size:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must be divisible by the world size ({world_size}); "
                             "use a world size that divides the kv heads")
        return cls(hidden_size, num_heads, num_kv_heads, world_size, rank)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world_size

    @property
    def local_kv_heads(self) -> int:
        return self.num_kv_heads // self.world_size

    @property
    def q_rows(self) -> slice:
        n = self.local_heads * self.head_dim
        return slice(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_rows(self) -> slice:
        n = self.local_kv_heads * self.head_dim
        return slice(self.rank * n, (self.rank + 1) * n)

    def full_weight_shapes(self) -> dict:
        D = self.head_dim
        return {"wq": (self.num_heads * D, self.hidden_size), "wk": (self.num_kv_heads * D, self.hidden_size),
                "wv": (self.num_kv_heads * D, self.hidden_size), "wo": (self.hidden_size, self.num_heads * D)}


def shard_full_weights(shape: TPShape, wq, wk, wv, wo) -> dict:
    """Check the unsharded ``nn.Linear``-layout weights and return this rank's shards."""
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
    return {"wq": given["wq"][shape.q_rows], "wk": given["wk"][shape.kv_rows],
            "wv": given["wv"][shape.kv_rows], "wo": given["wo"][:, shape.q_rows]}
