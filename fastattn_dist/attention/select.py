"""The one place that decides which kernel runs an attention call.

``resolve_backend`` says what a backend name means on a device (``auto`` -> the device family's
kernel, devices.py). ``kernel_for`` then takes the call itself into account: where the chosen kernel
cannot take it, the call goes to the next kernel of a fixed chain, and nowhere else:

    cudnn  -> triton   windows, key lengths, fp32/fp64, an LSE for the caller, head_dim not 64/128
    triton -> torch    float64 (no tensor-core path worth having)
    sdpa   -> torch    an LSE for the caller (SDPA's public API returns none)

``decode_kernel_for`` picks for decode: one query row per sequence against a KV cache whose lengths stay on the
device (the split-K kernel, or the prefill kernel with the lengths as its mask), or per sequence (windows).

``available`` says, before any rank starts, whether a backend can run on a device at all.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..devices import family_of
from ..masks import Mask
from .cudnn_split import supports

log = logging.getLogger("fastattn_dist")

BACKENDS = ("auto", "reference", "torch", "triton", "cudnn", "sdpa")
_told = set()  # (device, reason) already logged: say it once per process


def _triton_importable() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        return f"Triton is not importable ({e})"
    return None


def _interpreted() -> bool:
    from . import triton_fa  # needs Triton (an optional extra), which decides whether it interprets
    return triton_fa.INTERPRETED


def available(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on ``device``, else why not (one line)."""
    if backend not in BACKENDS:
        return f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}"
    if backend in ("auto", "reference", "torch"):
        return None
    if backend in ("cudnn", "sdpa") and device.type != "cuda":
        return f"the {backend} attention backend needs a CUDA GPU (this run is on {device.type}); use auto or torch"
    if backend == "triton":
        why = _triton_importable()
        if why:
            return why
        if device.type != "cuda" and not _interpreted():
            return ("the triton attention backend runs on CUDA GPUs, or on CPU under TRITON_INTERPRET=1 "
                    "(set before fastattn_dist is imported)")
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` stands for on ``device`` (``auto`` -> the family's kernel)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    fam = family_of(device)
    if fam.attention in ("cudnn", "triton"):
        why = _triton_importable()  # cudnn's fallback is the Triton kernel too
        if why:
            key = (str(device), why)
            if key not in _told:
                _told.add(key)
                log.warning("attention backend 'auto' on %s falls back to PyTorch SDPA: %s", device, why)
            return "sdpa"
    return fam.attention


def kernel_for(backend: str, q: torch.Tensor, k: torch.Tensor, mask: Mask, q_offset: int, return_lse: bool) -> str:
    """The kernel that runs this call: the resolved backend, or its fallback where it cannot take the call."""
    which = resolve_backend(backend, q.device)
    if which == "cudnn" and not (q.is_cuda and supports(q, k, mask, q_offset, return_lse)):
        which = "triton"
    if which == "triton" and q.dtype == torch.float64:
        which = "torch"
    if which == "sdpa" and return_lse:
        which = "torch"
    return which


def split_decode_runs(q: torch.Tensor) -> bool:
    """Whether the split-K decode kernel (triton_decode.py) takes these query rows."""
    if q.dtype == torch.float64 or q.shape[3] not in (16, 32, 64, 128, 256):
        return False
    return q.is_cuda or _interpreted()


def decode_kernel_for(backend: str, q: torch.Tensor, window: Optional[int]) -> str:
    """How a decode call runs: "split" (the split-K kernel: one row per sequence, no window), "lengths" (the
    prefill kernel ``kernel_for`` picks, the cache's lengths as its mask), or "per_sequence" (a window, or several
    new rows per sequence: one call per sequence, which reads the lengths on the host)."""
    if q.shape[1] != 1 or window is not None:
        return "per_sequence"
    if resolve_backend(backend, q.device) not in ("torch", "reference") and split_decode_runs(q):
        return "split"
    return "lengths"
