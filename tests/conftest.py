"""Shared test settings: tolerances by dtype (stated once) and comparison helpers."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# Spawned ranks import test modules by name: make this folder importable for them.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run in the interpreter. @triton.jit decides when a kernel module is imported,
# so this is set before any test module imports one: which tests run, and in which order, does not matter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Max error relative to the reference's largest magnitude, by the dtype the computation ran in.
# fp32: float32 rounding over sums of ~1e3 terms; bf16/fp16: one rounding of the inputs and output
# (8 and 11 bits of mantissa) dominates.
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (0 for an all-zero reference and output); NaN never passes."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if torch.isnan(out).any():
        return float("inf")
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def run_cli(*args, timeout=240) -> subprocess.CompletedProcess:
    """``python -m fastattn_dist ARGS`` as users run it; stdout and stderr captured as text."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "fastattn_dist", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3e} > {REL_TOL[dtype]:.1e} ({dtype})"


@pytest.fixture(autouse=True)
def _one_thread_per_test_process():
    # Spawned ranks set their own thread count; the test process itself stays light on the 2-core CI box.
    prev = torch.get_num_threads()
    torch.set_num_threads(min(prev, 2))
    yield
    torch.set_num_threads(prev)
