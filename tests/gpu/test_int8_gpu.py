"""The 8-bit attention kernel compiled on a CUDA GPU: every autotune candidate config, each precision the GPU
runs, against the torch model of the same arithmetic (attention/quantized.py) and float64 attention.

Skipped without CUDA (and under TRITON_INTERPRET); run with the device tool:
``python -m pytest tests/gpu/test_int8_gpu.py -q``. The interpreter tests check the arithmetic on CPU; only
here does the code generator's output run (the fp8 P @ V MMA with a register operand gave non-finite rows
on an H200, which no interpreter test could see). Each config runs three times: those rows varied run to run.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                reason="needs CUDA (and compiled, not interpreted, kernels)")

from fastattn_dist import Causal, KeyPadding  # noqa: E402
from fastattn_dist.attention import quantized as qz  # noqa: E402
from fastattn_dist.attention.reference import reference_attention  # noqa: E402

# vs the torch model of the same integers: exp2 and FMA contraction differ in the last bits, moving a P weight
# by one rounding step now and then (int8: 1/127 of the block's largest; e4m3: up to 1/8 of it); Hopper's fp8
# QK MMA also accumulates in reduced precision. A wrong layout or mask is off by O(1).
MODEL_TOL = {"int8": 2e-3, "int8-fp8": 5e-3, "fp8": 2e-2}
REF_TOL = {"int8": 0.035, "int8-fp8": 0.06, "fp8": 0.08}  # vs float64 attention: the 8-bit formats' own error


def precisions():
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    return ["int8", "int8-fp8", "fp8"] if cap >= (8, 9) else ["int8"]


def configs():
    if not torch.cuda.is_available():
        return []
    from fastattn_dist.attention import triton_int8 as ti
    major = torch.cuda.get_device_capability()[0]
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in ti.family_configs(major, 128)]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("precision", precisions())
@pytest.mark.parametrize("mask_name", ["causal", "padding"])
def test_every_config_matches_the_torch_model_and_float64(precision, mask_name):
    from fastattn_dist.attention import triton_int8 as ti

    B, S, Hq, Hkv, D = 2, 1000, 8, 2, 128  # rows and keys not a multiple of any block, GQA 4
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(B, S, h, D, device="cuda", generator=g).bfloat16() for h in (Hq, Hkv, Hkv))
    mask = Causal() if mask_name == "causal" else KeyPadding([S, 613], causal=False)
    kv = ti.quantize_kv_triton(k, v, precision=precision, key_lengths=mask.key_lengths)
    models = {}  # P is quantized against each key block's row max: the model takes the config's block
    ref = reference_attention(q.double(), k.double(), v.double(), mask)
    bad = []
    for cfg in configs():
        for rep in range(3):
            out = ti.triton_attention_quantized_kv(q, kv, mask, config=dict(cfg))
            torch.cuda.synchronize()
            finite = bool(torch.isfinite(out).all())
            bn = cfg["BLOCK_N"]
            if bn not in models:
                models[bn] = qz.attention_quantized_kv_torch(q, kv, mask, block_n=bn)
            e_model, e_ref = rel(out, models[bn]), rel(out, ref)
            if not finite or e_model > MODEL_TOL[precision] or e_ref > REF_TOL[precision]:
                bad.append(f"{cfg} run {rep}: finite {finite}, vs model {e_model:.2e}, vs float64 {e_ref:.2e}")
    assert not bad, f"{precision} {mask_name}:\n" + "\n".join(bad)
