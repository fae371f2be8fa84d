"""Fused Triton kernels of the decoder's small steps (GPU; CPU tensors under TRITON_INTERPRET=1).

A decode step is mostly small kernels: each pays a launch and a pass over memory, and a 7B model has
32 layers of them. These fuse the elementwise chains of models/llama.py into one kernel each:

  add_rms_norm   h <- h + delta (+ bias); n = RMSNorm(h) * weight    (Hugging Face's rounding order:
                 the sum in the model dtype, the norm in float32, cast, then scaled in the model dtype)
  rope_append    q, k rotated at each sequence's own position; k and v written into the KV cache there (the int8
                 cache: quantized as written, per token, as attention/int8_kv.py does)
  silu_mul       silu(gate) * up of the fused gate/up projection's output
Each has the plain PyTorch version in llama.py (the CPU path, and the reference in the tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..attention.int8_kv import Int8KV
from ..attention.triton_int8 import _inverse_scale, _to_8bit  # the 8-bit kernels' rounding, shared


@triton.jit
def _add_rms_norm_kernel(H, DELTA, BIAS, W, OUT_N, N, eps, HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    h = tl.load(H + row * N + cols, mask=ok, other=0.0)
    if HAS_DELTA:  # as Hugging Face: the sublayer's output (+ its bias), then the residual add
        d = tl.load(DELTA + row * N + cols, mask=ok, other=0.0)
        if HAS_BIAS:
            d = d + tl.load(BIAS + cols, mask=ok, other=0.0)
        h = h + d
        tl.store(H + row * N + cols, h, mask=ok)
    x = h.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    y = (x * tl.math.rsqrt(var + eps)).to(H.dtype.element_ty)
    w = tl.load(W + cols, mask=ok, other=0.0)
    tl.store(OUT_N + row * N + cols, w * y, mask=ok)


def add_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, delta: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``h += delta (+ bias)`` in place (rows of ``[N, hidden]``, contiguous), returns RMSNorm(h) * weight."""
    rows, n = h.shape
    out = torch.empty_like(h)
    _add_rms_norm_kernel[(rows,)](h, delta if delta is not None else h, bias if bias is not None else weight, weight,
                                  out, n, eps, HAS_DELTA=delta is not None, HAS_BIAS=bias is not None,
                                  BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 4096 else 4)
    return out


@triton.jit
def _store_int8(dst, scale_dst, x1, x2, m1, m2, i, HALF: tl.constexpr, INTERPRET: tl.constexpr):
    """One token's head [x1 | x2] minus the mean [m1 | m2] as int8 with its scale (attention/int8_kv.py's rounding)."""
    a = x1.to(tl.float32) - m1
    b = x2.to(tl.float32) - m2
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(a), 0), tl.max(tl.abs(b), 0)), 1e-30)
    inv = _inverse_scale(amax, 127.0)
    tl.store(dst + i, _to_8bit(a * inv, False, INTERPRET))
    tl.store(dst + HALF + i, _to_8bit(b * inv, False, INTERPRET))
    tl.store(scale_dst, amax * (1.0 / 127.0))


@triton.jit
def _rope_append_kernel(QKV, COS, SIN, POS, QO, KC, VC, KS, VS, KM, stride_qkv, stride_cb, stride_cs, stride_ch,
                        stride_sb, stride_ss, HQ, HKV, D: tl.constexpr, HALF: tl.constexpr, QUANT: tl.constexpr,
                        INTERPRET: tl.constexpr):
    # one program: sequence b, one head of q, k or v (heads in that order along axis 1)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(POS + b)
    i = tl.arange(0, HALF)
    base = QKV + b * stride_qkv + h * D
    x1 = tl.load(base + i)
    x2 = tl.load(base + HALF + i)
    if h < HQ + HKV:  # q or k: rotate pairs (i, i + D/2) by the angle of this position
        c = tl.load(COS + pos * D + i)
        s = tl.load(SIN + pos * D + i)
        a, bb = x1.to(tl.float32), x2.to(tl.float32)
        r1 = (a * c - bb * s).to(x1.dtype)
        r2 = (bb * c + a * s).to(x1.dtype)
        # one pointer name per branch: a name assigned in both branches of a runtime if must have one type
        # there, and q's pointer is 16-bit where an int8 cache's is not
        if h < HQ:
            dq = QO + b * HQ * D + h * D
            tl.store(dq + i, r1)
            tl.store(dq + HALF + i, r2)
        else:
            dk = KC + b * stride_cb + pos * stride_cs + (h - HQ) * stride_ch
            if QUANT:  # int8 with this token's scale, after the sequence's smoothing mean
                mean = KM + (b * HKV + h - HQ) * D
                _store_int8(dk, KS + b * stride_sb + pos * stride_ss + h - HQ, r1, r2, tl.load(mean + i),
                            tl.load(mean + HALF + i), i, HALF, INTERPRET)
            else:
                tl.store(dk + i, r1)
                tl.store(dk + HALF + i, r2)
    else:
        dv = VC + b * stride_cb + pos * stride_cs + (h - HQ - HKV) * stride_ch
        if QUANT:
            _store_int8(dv, VS + b * stride_sb + pos * stride_ss + h - HQ - HKV, x1, x2, 0.0, 0.0, i, HALF,
                        INTERPRET)
        else:
            tl.store(dv + i, x1)
            tl.store(dv + HALF + i, x2)


# Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when @triton.jit ran)
INTERPRETED = type(_rope_append_kernel).__name__ == "InterpretedFunction"


def rope_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                int8: Optional[Int8KV] = None) -> torch.Tensor:
    """``qkv`` ``[B, (heads + 2 kv_heads) * D]`` of one new token per sequence at ``positions`` ``[B]``: returns the
    rotated q ``[B, 1, heads, D]``; writes the rotated k and v into the caches (``[B, L, kv_heads, D]``) there.
    ``int8``: the caches are this int8 layer's: k and v are quantized as they are written (with their scales)."""
    B = qkv.shape[0]
    D = k_cache.shape[3]
    q = torch.empty(B, 1, heads, D, dtype=qkv.dtype, device=qkv.device)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and qkv.stride(1) == 1
    sc = (int8.k_scale, int8.v_scale, int8.k_mean) if int8 is not None else (k_cache, v_cache, k_cache)
    _rope_append_kernel[(B, heads + 2 * kv_heads)](
        qkv, cos, sin, positions, q, k_cache, v_cache, *sc, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), sc[0].stride(0), sc[0].stride(1), heads, kv_heads, D=D, HALF=D // 2,
        QUANT=int8 is not None, INTERPRET=INTERPRETED, num_warps=1)
    return q


@triton.jit
def _silu_mul_kernel(GU, OUT, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(GU + row * 2 * N + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * N + N + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * N + cols, (g / (1.0 + tl.exp(-g)) * u).to(OUT.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``[rows, 2 n]`` (gate | up) -> ``[rows, n]`` = silu(gate) * up."""
    rows, n2 = gate_up.shape
    n = n2 // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block, num_warps=4)
    return out
