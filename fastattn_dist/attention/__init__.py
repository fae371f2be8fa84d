"""The attention entry point: validation, then dispatch by backend and device.

Backends:
  ``reference``  standard attention with the mask materialised (the baseline; O(S^2) memory)
  ``torch``      two-level tiled flash attention in PyTorch (any device; the CPU path)
  ``triton``     the Triton FlashAttention-2 forward kernel (CUDA, compute capability >= 8.0,
                 or CPU tensors under TRITON_INTERPRET=1)
  ``cudnn``      cuDNN's fused attention, a causal row range cut into an unmasked prefix and a causal
                 diagonal merged by LSE (cudnn_split.py); what cuDNN cannot take goes to ``triton``
  ``sdpa``       PyTorch's scaled_dot_product_attention, memory-efficient kernel (older GPUs)
  ``auto``       cudnn on Hopper (compute capability 9.x, where cuDNN is the faster kernel), triton on
                 other CUDA GPUs >= 8.0 when Triton is installed, sdpa on older ones, torch on CPU
"""
from __future__ import annotations

from typing import Optional

import torch

from ..masks import MaskLike, resolve_mask
from .reference import reference_attention
from .tiled import BlockStats, tiled_attention

BACKENDS = ("auto", "reference", "torch", "triton", "cudnn", "sdpa")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise TypeError/ValueError unless q ``[B, Sq, Hq, D]`` and k, v ``[B, Sk, Hkv, D]`` fit together."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape {list(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim of q ({q.shape[3]}) and k ({k.shape[3]}) differ")
    if q.shape[1] < 1 or k.shape[1] < 1 or q.shape[0] < 1:
        raise ValueError(f"empty input: q {list(q.shape)}, k {list(k.shape)}")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``auto`` stands for on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        from . import dispatch_gpu
        return dispatch_gpu.auto_backend(device)
    return "torch"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike = "causal", *,
              q_offset: int = 0, backend: str = "auto", return_lse: bool = False,
              scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
              block_q: Optional[int] = None, block_k: Optional[int] = None,
              stats: Optional[BlockStats] = None):
    """Attention over q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` (GQA when Hq > Hkv).

    ``mask``: "causal", "none", or a Mask object. ``q_offset``: query row i sits at absolute
    position ``q_offset + i`` (a tile of rows of a longer sequence). ``out``: a ``[B, Sq, Hq, D]``
    tensor (a view into a larger buffer is fine) that receives the result. Returns ``out``,
    or ``(out, lse)`` with ``lse`` ``[B, Hq, Sq]`` float32 when ``return_lse``.
    """
    check_qkv(q, k, v)
    m = resolve_mask(mask)
    m.validate(q.shape[0], k.shape[1])
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be an int >= 0, got {q_offset!r}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be a {q.dtype} tensor of shape {list(q.shape)} on {q.device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    which = resolve_backend(backend, q.device)
    return run_backend(which, q, k, v, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out,
                       block_q=block_q, block_k=block_k, stats=stats)


def run_backend(which: str, q, k, v, m, *, q_offset: int = 0, scale: Optional[float] = None,
                return_lse: bool = False, out: Optional[torch.Tensor] = None, block_q: Optional[int] = None,
                block_k: Optional[int] = None, stats: Optional[BlockStats] = None):
    """``attention`` without validation, for callers that validated once (the block, per tile)."""
    if which == "reference":
        res = reference_attention(q, k, v, m, q_offset=q_offset, scale=scale, return_lse=return_lse)
        if out is not None:
            o = res[0] if return_lse else res
            out.copy_(o)
            res = (out, res[1]) if return_lse else out
        return res
    if which == "torch":
        return tiled_attention(q, k, v, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out,
                               block_q=block_q, block_k=block_k, stats=stats)
    if which == "triton":
        from .triton_fa import triton_attention
        return triton_attention(q, k, v, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out)
    if which == "cudnn":
        from .cudnn_split import cudnn_attention
        return cudnn_attention(q, k, v, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out)
    from .sdpa import sdpa_attention
    return sdpa_attention(q, k, v, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out)

__all__ = ["attention", "run_backend", "check_qkv", "resolve_backend", "BACKENDS", "BlockStats",
           "reference_attention", "tiled_attention"]
