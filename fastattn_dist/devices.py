"""Device families: what ``auto`` means on each, for the attention kernel and the cost model alike.

One table, read by ``attention.select`` (which kernel) and by ``tuning`` (which cost profile), so the
two always agree on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    name: str        # also the key of the cost profile in tuning.PROFILES
    attention: str   # the kernel ``backend="auto"`` picks
    why: str


CPU = Family("cpu", "torch", "the PyTorch two-level kernel is the CPU path")
# cuDNN's fused attention is 15-25% faster than our Triton kernel on Hopper (docs/attention_kernel.md)
HOPPER = Family("hopper", "cudnn", "compute capability 9.x: cuDNN whole calls, causal tiles split and merged by LSE")
AMPERE = Family("gpu", "triton", "compute capability 8.x: our Triton kernel")
OLDER = Family("gpu", "sdpa", "compute capability below 8.0: PyTorch SDPA (memory-efficient kernel)")


def family_of(device: torch.device) -> Family:
    if device.type != "cuda":
        return CPU
    idx = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(idx)
    if major >= 9:
        return HOPPER
    return AMPERE if major >= 8 else OLDER
