"""The model's input checks: token ids, the real lengths of right-padded prompts, positive ints. Every rank runs
them on its own copy of the input before any collective, so bad input is one clear error on every rank."""
from __future__ import annotations

from typing import Optional

import torch


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_ids(ids, vocab_size: int, device: torch.device) -> torch.Tensor:
    """``ids``: an int64/int32 ``[batch, seq]`` tensor of ids in the vocabulary; returned as int64 on ``device``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an int64 [batch, seq] tensor, got {ids.dtype} {list(ids.shape)}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"input_ids is empty: shape {list(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}) (the vocabulary), got min {lo}, max {hi}")
    return ids.to(device, torch.int64)


def check_lengths(lengths, batch: int, seq: int, device: torch.device) -> Optional[torch.Tensor]:
    """Real lengths of right-padded prompts (``batch`` ints in [1, seq]), or None when none is padded."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.shape != (batch,):
        raise ValueError(f"lengths must be {batch} ints (one per sequence), got {lengths.tolist()}")
    if int(lengths.min()) < 1 or int(lengths.max()) > seq:
        raise ValueError(f"lengths must lie in [1, {seq}] (the padded prompt length), got {lengths.tolist()}")
    return None if int(lengths.min()) == seq else lengths.to(device, torch.int64)
