"""The one place that decides which kernel runs an attention call.

``resolve_backend`` says what a backend name means on a device (``auto`` -> the device family's
kernel, devices.py). ``kernel_for`` then takes the call itself into account: where the chosen kernel
cannot take it, the call goes to the next kernel of a fixed chain, and nowhere else:

    cudnn  -> triton   windows, key lengths, fp32/fp64, an LSE for the caller, head_dim not 64/128
    triton -> torch    float64 (no tensor-core path worth having)
    sdpa   -> torch    an LSE for the caller (SDPA's public API returns none)

``available`` says, before any rank starts, whether a backend can run on a device at all.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..devices import family_of
from ..masks import Mask

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
    from . import triton_fa
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
    from .cudnn_split import supports

    which = resolve_backend(backend, q.device)
    if which == "cudnn" and not (q.is_cuda and supports(q, k, mask, q_offset, return_lse)):
        which = "triton"
    if which == "triton" and q.dtype == torch.float64:
        which = "torch"
    if which == "sdpa" and return_lse:
        which = "torch"
    return which
