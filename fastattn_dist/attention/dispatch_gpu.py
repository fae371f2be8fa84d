"""What ``backend="auto"`` means on a CUDA device: cuDNN split tiles on Hopper, the Triton kernel on other
GPUs where it runs, else PyTorch SDPA."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("fastattn_dist")
_told = set()  # (device index, reason) already logged: say it once per process


def auto_backend(device: torch.device) -> str:
    """"cudnn" on compute capability 9.x (H100/H200: cuDNN's attention is 15-25% faster than our kernel,
    docs/attention_kernel.md), "triton" on other GPUs >= 8.0, with Triton importable (the cudnn backend
    sends what cuDNN cannot take to Triton); else "sdpa" (logged once, with why)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    reason = None
    if (major, minor) < (8, 0):
        reason = f"compute capability {major}.{minor} is below 8.0"
    else:
        try:
            import triton  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the install
            reason = f"Triton is not importable ({e})"
    if reason is None:
        return "cudnn" if major == 9 else "triton"
    if (idx, reason) not in _told:
        _told.add((idx, reason))
        log.warning("attention backend 'auto' on cuda:%d falls back to PyTorch SDPA (memory-efficient kernel): %s",
                    idx, reason)
    return "sdpa"
