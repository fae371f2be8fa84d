"""A small bounded mapping: the block's plan and CUDA-graph caches keep only their most recent entries."""
from __future__ import annotations

from collections import OrderedDict


class LRUCache(OrderedDict):
    """``get`` marks an entry as recently used; ``put`` evicts the least recently used beyond ``maxsize``."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize

    def get(self, key, default=None):
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)
