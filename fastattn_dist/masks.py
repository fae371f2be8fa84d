"""tiling-mask: attention masks as descriptions, never as an S x S tensor.

A mask is three facts about which key position ``j`` a query at absolute
position ``p`` may see:

* ``causal``: ``j <= p``;
* ``window`` (with causal): ``j > p - window`` (the last ``window`` keys, self included);
* ``key_lengths``: per sequence ``b``, ``j < key_lengths[b]`` (right padding).

From these, any (query tile, key block) pair is classified as FULL (every
pair visible: no mask arithmetic), PARTIAL (mask element-wise) or SKIP (nothing
visible: the block is never loaded). Rows that see no key at all produce zeros.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Union

import torch


class BlockKind(enum.Enum):
    FULL = "full"
    PARTIAL = "partial"
    SKIP = "skip"


@dataclass(frozen=True, eq=False)
class Mask:
    """Base description; use the subclasses ``NoMask``, ``Causal``, ``SlidingWindow``, ``KeyPadding``."""

    causal: bool = False
    window: Optional[int] = None
    key_lengths: Optional[torch.Tensor] = None

    # -- validation -----------------------------------------------------
    def validate(self, batch: int, seq_k: int) -> None:
        """Raise ValueError if this mask cannot apply to ``batch`` sequences of ``seq_k`` keys."""
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, int):
                raise TypeError(f"window must be an int, got {type(self.window).__name__}")
            if self.window < 1:
                raise ValueError(f"window must be >= 1, got {self.window}")
            if not self.causal:
                raise ValueError("a sliding window is only defined together with causal masking")
        if self.key_lengths is not None:
            kl = self.key_lengths
            if not isinstance(kl, torch.Tensor):
                raise TypeError("key_lengths must be a torch.Tensor")
            if kl.dim() != 1 or kl.shape[0] != batch:
                raise ValueError(f"key_lengths must have shape [{batch}] (one length per sequence), got {list(kl.shape)}")
            if kl.dtype.is_floating_point or kl.dtype.is_complex or kl.dtype == torch.bool:
                raise TypeError(f"key_lengths must be an integer tensor, got {kl.dtype}")
            # Reading the values syncs with the device: do it once per lengths tensor and content version.
            seen = (batch, seq_k, id(kl), kl._version)
            if getattr(self, "_validated", None) != seen:
                lo, hi = int(kl.min()), int(kl.max())
                if lo < 1 or hi > seq_k:
                    raise ValueError(f"key_lengths must lie in [1, {seq_k}] (the key sequence length), "
                                     f"got min {lo}, max {hi}")
                object.__setattr__(self, "_validated", seen)

    # -- per-block classification -----------------------------------------
    def classify(self, q_start: int, q_end: int, k_start: int, k_end: int,
                 len_min: Optional[int] = None, len_max: Optional[int] = None) -> BlockKind:
        """Classify queries at absolute positions [q_start, q_end) against keys [k_start, k_end).

        ``len_min``/``len_max`` are the smallest and largest key length over the
        batch (given by the caller, who reads them once, so no device sync here).
        """
        if q_end <= q_start or k_end <= k_start:
            return BlockKind.SKIP
        full = True
        if self.key_lengths is not None:
            if k_start >= len_max:
                return BlockKind.SKIP
            full = full and k_end <= len_min
        if self.causal:
            if k_start > q_end - 1:  # every key after the last query
                return BlockKind.SKIP
            full = full and k_end - 1 <= q_start
            if self.window is not None:
                if k_end - 1 < q_start - self.window + 1:  # every key before the first query's window
                    return BlockKind.SKIP
                full = full and k_start >= q_end - self.window
        return BlockKind.FULL if full else BlockKind.PARTIAL

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor,
                key_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Boolean visibility for a PARTIAL block: ``[Q, K]``, or ``[B, Q, K]`` with key lengths.

        Only ever called on one block's positions, so its size is block_q x block_k.
        """
        ok = torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q_pos.device)
        if self.causal:
            diff = q_pos[:, None] - k_pos[None, :]
            ok = diff >= 0
            if self.window is not None:
                ok = ok & (diff < self.window)
        if self.key_lengths is not None:
            kl = self.key_lengths if key_lengths is None else key_lengths
            ok = ok[None] & (k_pos[None, None, :] < kl.to(k_pos.device)[:, None, None])
        return ok

    def visible_keys_per_row(self, positions: torch.Tensor, seq_k: int) -> torch.Tensor:
        """Number of visible keys for queries at ``positions`` (batch-averaged): the attention cost per row."""
        n = torch.full_like(positions, seq_k, dtype=torch.float64)
        if self.key_lengths is not None:
            n = torch.minimum(n, self.key_lengths.double().mean().expand_as(n))
        if self.causal:
            n = torch.minimum(n, positions.double() + 1)
            if self.window is not None:
                n = torch.clamp(n, max=float(self.window))
        return n.clamp(min=0)

    def slice_batch(self, b0: int, b1: int) -> "Mask":
        """The same mask for sequences [b0, b1) of the batch."""
        if self.key_lengths is None:
            return self
        return Mask(self.causal, self.window, self.key_lengths[b0:b1])

    def structure(self) -> tuple:
        """What plans and captured graphs depend on, without the key lengths' values (no device sync)."""
        return (self.causal, self.window, self.key_lengths is not None)

    def describe(self) -> str:
        """For people (reads the key lengths: a device sync when they live on a GPU; not for hot paths)."""
        parts = ["causal" if self.causal else "none"]
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.key_lengths is not None:
            parts.append(f"key_lengths={self.key_lengths.tolist()}")
        return ",".join(parts)

    __repr__ = describe


class NoMask(Mask):
    """Every query sees every key."""

    def __init__(self) -> None:
        super().__init__(False, None, None)


class Causal(Mask):
    """Query at position p sees keys 0..p."""

    def __init__(self) -> None:
        super().__init__(True, None, None)


class SlidingWindow(Mask):
    """Causal, limited to the last ``window`` keys (self included): keys p-window+1..p."""

    def __init__(self, window: int) -> None:
        super().__init__(True, window, None)
        self.validate(1, 1)  # a bad window fails where it is written, not at the first forward


class KeyPadding(Mask):
    """Per-sequence key lengths (right padding): sequence b sees keys 0..lengths[b]-1.

    Causal by default (batched prefill); ``causal=False`` for encoder-style attention,
    ``window`` to combine with a sliding window.
    """

    def __init__(self, lengths, causal: bool = True, window: Optional[int] = None) -> None:
        if not isinstance(lengths, torch.Tensor):
            values = list(lengths) if isinstance(lengths, (list, tuple)) else None
            if values is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise TypeError(f"KeyPadding lengths must be a list of ints or an integer tensor, got {lengths!r}")
            lengths = torch.tensor(values, dtype=torch.int64)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        super().__init__(causal, window, lengths)


MaskLike = Union[str, Mask, None]


def resolve_mask(mask: MaskLike) -> Mask:
    """Turn the user's ``mask`` argument into a Mask; unknown values raise ValueError/TypeError."""
    if mask is None:
        return NoMask()
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, str):
        key = mask.strip().lower()
        if key == "causal":
            return Causal()
        if key in ("none", "full", "no_mask"):
            return NoMask()
        if key.startswith("sliding_window:") or key.startswith("window:"):
            try:
                w = int(key.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"bad window in mask {mask!r}; expected e.g. 'sliding_window:256'") from None
            return SlidingWindow(w)
        raise ValueError(f"unknown mask {mask!r}; expected 'causal', 'none', 'sliding_window:W' or a Mask object "
                         "(Causal(), SlidingWindow(w), KeyPadding(lengths), NoMask())")
    raise TypeError(f"mask must be a str or a Mask object, got {type(mask).__name__}")
