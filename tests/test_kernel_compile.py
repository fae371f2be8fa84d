"""The GPU kernels compile for real GPU targets (Hopper, Ada, Ampere), here without a GPU: Triton's code generator
and ptxas, which the interpreter tests never reach (tests/kernel_compile.py says how). On an H200 the fp8 variants
of the 8-bit kernels and the int8 KV cache's fused append failed to compile while every interpreter test passed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("cc", [90, 89, 80])
def test_gpu_kernels_compile_for_the_target(cc):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "kernel_compile.py"), str(cc)], capture_output=True,
                       text=True, timeout=600, env=env)
    where = [line for line in r.stderr.splitlines() if line.startswith("compiling")][-1:]
    assert r.returncode == 0, f"the compiler process ended with {r.returncode} at {where}: {r.stderr[-1500:]}"
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["failed"] == [], "\n".join(report["failed"])
    names = " ".join(report["compiled"])
    for kernel in ("_kv_stats", "_kv_finalize", "_kv_quantize", "_qattn_fwd", "split_kernel", "combine_kernel",
                   "_rope_append_kernel", "_add_rms_norm_kernel", "_silu_mul_kernel"):
        assert kernel + "(" in names, f"{kernel} was not launched"
    assert "QUANT=True" in names and "IS_CAUSAL=False" in names
    # fp8 dots need Ada or Hopper: there every 8-bit variant is built, and only int8 below
    assert ("PV_FP8=True" in names and "QK_FP8=True" in names and "K_FP8=True" in names) == (cc >= 89)
