"""The input check every attention entry point shares: q, k and v whose shapes, dtypes and devices fit together."""
from __future__ import annotations

from typing import Sequence, Type

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    """"fp16, bf16 or fp32": the dtypes as an error message lists them."""
    names = [_NAMES[d] for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
              what: str = "attention", type_error: Type[Exception] = TypeError) -> None:
    """Raise unless q ``[B, Sq, Hq, D]`` and k, v ``[B, Sk, Hkv, D]`` fit together: ``type_error`` for a wrong type
    or dtype (TypeError; ValueError where an API raises ValueError for everything), ValueError for the rest."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise type_error(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape {list(t.shape)}")
        if t.dtype not in dtypes:
            raise type_error(f"{name}: {what} takes {dtype_names(dtypes)} tensors, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise type_error(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch / head_dim of q {list(q.shape)} and k {list(k.shape)} differ")
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"empty input: q {list(q.shape)}, k {list(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
