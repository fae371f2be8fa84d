"""The attention entry point: validation, then the kernel ``select.kernel_for`` picks for the call.

Backends:
  ``reference``  standard attention with the mask materialised (the baseline; O(S^2) memory)
  ``torch``      two-level tiled flash attention in PyTorch (any device; the CPU path)
  ``triton``     the Triton FlashAttention-2 forward kernel (CUDA, compute capability >= 8.0,
                 or CPU tensors under TRITON_INTERPRET=1)
  ``cudnn``      cuDNN's fused attention, a causal row range cut into an unmasked prefix and a causal
                 diagonal merged by LSE (cudnn_split.py)
  ``sdpa``       PyTorch's scaled_dot_product_attention, memory-efficient kernel (older GPUs)
  ``auto``       the device family's kernel (devices.py): cudnn on Hopper, triton on other GPUs >= 8.0,
                 sdpa on older ones, torch on CPU
What a kernel cannot take goes down one fixed chain (select.py): cudnn -> triton -> torch, sdpa -> torch.

``precision``: "bf16" (default: no quantization, the inputs' dtype), or 8-bit attention, "int8" (INT-FlashAttention:
int8 Q K^T and P V, K smoothed), "fp8" (e4m3 both), "int8-fp8" (int8 Q K^T, e4m3 P V): the Triton kernel
(triton_int8.py) on GPUs, the torch model of its arithmetic (quantized.py) on CPU; select.py decides.
``quantize_kv_for`` + ``attend_quantized`` split an 8-bit call in two, so that K/V quantized once serve many
query tiles (the block's and the model's KV sinks, kv.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..masks import Mask, MaskLike, resolve_mask
from . import quantized as qz
from .checks import check_qkv
from .cudnn_split import split_attention
from .reference import reference_attention
from .sdpa import sdpa_attention
from .select import (BACKENDS, PRECISIONS, QUANTIZED_KERNELS, available, kernel_for, quantized_kernel_for,
                     resolve_backend)
from .tiled import BlockStats, tiled_attention

def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_options(q_offset, scale, block_q, block_k, return_lse) -> None:
    """The numeric knobs of ``attention``: every one checked (a bad block size once gave zeros)."""
    _check_int("q_offset", q_offset, 0)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None:
            _check_int(name, b, 1)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike = "causal", *,
              q_offset: int = 0, backend: str = "auto", return_lse: bool = False,
              scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
              block_q: Optional[int] = None, block_k: Optional[int] = None,
              stats: Optional[BlockStats] = None, precision: str = "bf16"):
    """Attention over q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` (GQA when Hq > Hkv).

    ``mask``: "causal", "none", or a Mask object. ``q_offset``: query row i sits at absolute
    position ``q_offset + i`` (a tile of rows of a longer sequence). ``out``: a ``[B, Sq, Hq, D]``
    tensor (a view into a larger buffer is fine) that receives the result. ``block_q``/``block_k``/``stats``:
    the torch kernel's tile sizes and block counts (unused at an 8-bit precision). ``precision``: "bf16" (no quantization) or "int8", "fp8", "int8-fp8"
    (the module docstring; fp16/bf16/fp32 inputs). Returns ``out``, or ``(out, lse)`` with ``lse``
    ``[B, Hq, Sq]`` float32 (natural log) when ``return_lse``.
    """
    check_qkv(q, k, v)
    m = resolve_mask(mask)
    m.validate(q.shape[0], k.shape[1])
    check_options(q_offset, scale, block_q, block_k, return_lse)
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):
        raise ValueError(f"out must be a {q.dtype} tensor of shape {list(q.shape)} on {q.device}, got "
                         + (f"{out.dtype} {list(out.shape)} on {out.device}" if isinstance(out, torch.Tensor)
                            else type(out).__name__))
    why = available(backend, q.device, precision)
    if why:
        raise ValueError(why)
    which = kernel_for(backend, q, k, m, q_offset, return_lse, precision)
    return run_kernel(which, q, k, v, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out,
                      block_q=block_q, block_k=block_k, stats=stats, precision=precision)


def quantize_kv_for(which: str, k: torch.Tensor, v: torch.Tensor, precision: str,
                    key_lengths: Optional[torch.Tensor] = None) -> qz.QuantizedKV:
    """K/V ``[B, Sk, Hkv, D]`` (any strides) quantized for the 8-bit kernel ``which`` (``kernel_for``'s), K
    smoothed; statistics over keys [0, key_lengths[b])."""
    if which == "quantized-triton":
        from .triton_int8 import quantize_kv_triton  # needs Triton (an optional extra): loaded where it runs
        return quantize_kv_triton(k, v, precision=precision, key_lengths=key_lengths)
    qz.check_inputs(k, k, v, precision)
    return qz.quantize_kv(k, v, precision=precision, key_lengths=key_lengths)


def attend_quantized(which: str, q: torch.Tensor, kv: qz.QuantizedKV, m: Mask, *, q_offset: int = 0,
                     scale: Optional[float] = None, return_lse: bool = False, out: Optional[torch.Tensor] = None):
    """q ``[B, Sq, Hq, D]`` (quantized per row inside) against ``quantize_kv_for``'s K/V: the attention() contract."""
    if which == "quantized-triton":
        from .triton_int8 import triton_attention_quantized_kv  # needs Triton: loaded where it runs
        return triton_attention_quantized_kv(q, kv, m, q_offset=q_offset, scale=scale, return_lse=return_lse,
                                             out=out)
    return qz.attention_quantized_kv_torch(q, kv, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out)


def run_kernel(which: str, q, k, v, m: Mask, *, q_offset: int = 0, scale: Optional[float] = None,
               return_lse: bool = False, out: Optional[torch.Tensor] = None, block_q: Optional[int] = None,
               block_k: Optional[int] = None, stats: Optional[BlockStats] = None, precision: str = "bf16"):
    """Run the kernel ``kernel_for`` chose, on validated input (the block calls this per tile)."""
    if which in QUANTIZED_KERNELS.values():
        kv = quantize_kv_for(which, k, v, precision, m.key_lengths)
        return attend_quantized(which, q, kv, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out)
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
        from .triton_fa import triton_attention  # needs Triton (an optional extra): loaded where it runs
        return triton_attention(q, k, v, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out)
    if which == "cudnn":
        return split_attention(q, k, v, m, q_offset=q_offset, scale=scale, out=out, return_lse=return_lse)
    return sdpa_attention(q, k, v, m, q_offset=q_offset, scale=scale, out=out)


__all__ = ["attention", "run_kernel", "kernel_for", "check_qkv", "check_options", "resolve_backend", "available",
           "BACKENDS", "PRECISIONS", "BlockStats", "reference_attention", "tiled_attention", "quantize_kv_for",
           "attend_quantized", "quantized_kernel_for"]
