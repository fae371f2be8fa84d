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

``precision`` (every function here takes it): "bf16" (default) is no quantization, the inputs' own dtype as
before; "int8", "fp8", "int8-fp8" run 8-bit attention (quantized.py), whose kernel is decided here too:

    auto, triton  -> the Triton kernel (triton_int8.py) on CUDA, compute capability >= 8.0 (fp8 and int8-fp8:
                     >= 8.9), or on CPU tensors under TRITON_INTERPRET=1 with backend triton
    auto, torch   -> the torch model of the same arithmetic (quantized.py) on CPU (torch: on any device)
    reference, sdpa, cudnn: no 8-bit path (a ValueError, not a silent fallback)
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..devices import family_of
from ..masks import Mask
from .cudnn_split import supports
from .quantized import PRECISIONS as QUANTIZED

PRECISIONS = ("bf16",) + QUANTIZED
QUANTIZED_KERNELS = {"triton": "quantized-triton", "torch": "quantized-torch"}  # backend -> 8-bit kernel

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


def check_precision(precision: str) -> Optional[str]:
    """None for a known ``precision`` name, else why not (one line)."""
    if precision not in PRECISIONS:
        return f"unknown attention precision {precision!r}; expected one of {', '.join(PRECISIONS)}"
    return None


def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device)


def _quantized_available(backend: str, device: torch.device, precision: str) -> Optional[str]:
    """Whether 8-bit attention at ``precision`` runs with ``backend`` on ``device`` (the module docstring)."""
    if backend not in ("auto", "triton", "torch"):
        return (f"attention precision {precision!r} runs on attention backend auto, triton or torch, not {backend!r} "
                "(it has no 8-bit path)")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return None
    why = _triton_importable()
    if why:
        return f"attention precision {precision!r} on {device.type} needs the Triton kernel: {why}"
    if device.type != "cuda":
        return None if _interpreted() else ("the 8-bit triton kernel runs on CUDA GPUs, or on CPU under "
                                            "TRITON_INTERPRET=1 (set before fastattn_dist is imported); use auto "
                                            "or torch")
    cap = _capability(device)
    need = (8, 9) if "fp8" in precision else (8, 0)
    if cap < need:
        return (f"attention precision {precision!r} needs compute capability >= {need[0]}.{need[1]}, this GPU has "
                f"{cap[0]}.{cap[1]}" + ("; use precision 'int8'" if need == (8, 9) and cap >= (8, 0) else ""))
    return None


def available(backend: str, device: torch.device, precision: str = "bf16") -> Optional[str]:
    """None if ``backend`` can run on ``device`` at ``precision``, else why not (one line)."""
    if backend not in BACKENDS:
        return f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}"
    why = check_precision(precision)
    if why or precision != "bf16":
        return why or _quantized_available(backend, device, precision)
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


def resolve_backend(backend: str, device: torch.device, precision: str = "bf16") -> str:
    """The concrete backend ``backend`` stands for on ``device`` (``auto`` -> the family's kernel; at an 8-bit
    ``precision``: triton on CUDA, torch elsewhere)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if precision != "bf16":
        return "triton" if device.type == "cuda" else "torch"
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


def kernel_for(backend: str, q: torch.Tensor, k: torch.Tensor, mask: Mask, q_offset: int, return_lse: bool,
               precision: str = "bf16") -> str:
    """The kernel that runs this call: the resolved backend, or its fallback where it cannot take the call; at an
    8-bit ``precision`` "quantized-triton" or "quantized-torch" (no fallback: ValueError for what cannot run)."""
    if precision != "bf16":
        return quantized_kernel_for(backend, q.device, precision)
    which = resolve_backend(backend, q.device)
    if which == "cudnn" and not (q.is_cuda and supports(q, k, mask, q_offset, return_lse)):
        which = "triton"
    if which == "triton" and q.dtype == torch.float64:
        which = "torch"
    if which == "sdpa" and return_lse:
        which = "torch"
    return which


def quantized_kernel_for(backend: str, device: torch.device, precision: str) -> str:
    """The 8-bit kernel of ``backend`` at ``precision``: "quantized-triton" or "quantized-torch" (else ValueError)."""
    which = resolve_backend(backend, device, precision)
    why = check_precision(precision) or (None if which in QUANTIZED_KERNELS else
                                         _quantized_available(which, device, precision))
    if why:
        raise ValueError(why)
    return QUANTIZED_KERNELS[which]


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


def host_decode_kernel_for(impl: str, kernel, unavailable: Optional[str], q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor) -> tuple:
    """How a decode call over host memory (host_decode.py) runs: ("compiled", None), or ("torch", why not compiled).
    ``kernel``: the compiled module, or None with the reason it is ``unavailable``; ``impl`` as host_decode takes it
    ("torch" forces torch; the caller raises on "compiled" with a reason)."""
    if impl == "torch":
        return "torch", "impl='torch'"
    if kernel is None:
        return "torch", unavailable
    D = q.shape[3]
    if D % kernel.head_dim_multiple() or k.stride(3) != 1 or v.stride(3) != 1:
        return "torch", (f"head_dim {D} is not a multiple of {kernel.head_dim_multiple()} or D is not the innermost "
                         "dimension")
    return "compiled", None
