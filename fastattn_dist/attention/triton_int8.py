"""8-bit Triton attention forward (INT-FlashAttention / SageAttention): int8 or fp8 e4m3 tensor-core dots.

The scheme (granularities, smoothing, P at a fixed scale) is described once, in ``quantized.py``;
``quantized.attention_from_quantized`` is the same arithmetic in torch and the tests hold this file
to it. What happens on the device, per call:

  pass                      grid                      reads                writes
  1 K/V statistics          (B*Hkv, Sk / CHUNK)       K, V (2 x 16 bit)    per-chunk K sums (fp64), |V| maxima
  2 finalize                (B*Hkv,)                  the partials         K mean, V scale (and 1/scale)
  3 K/V quantization        (B*Hkv, Sk / BLOCK_S)     K, V (2 x 16 bit)    K int8/fp8 + per-token scale,
                                                                           V^T int8/fp8 (keys contiguous)
  4 attention               (B*Hq, Sq / BLOCK_M)      Q (16 bit), K8, V8   out (+ LSE)

So K and V are read twice at 16 bit and written once at 8 bit (5 bytes an element over the passes;
pass 2 is tiny), and Q is quantized inside the attention kernel as its tile is loaded (per-token
amax in registers: no Q pass, no Q write). Passes 1-3 depend on K and V only, so the block can
quantize K/V once (``quantize_kv_triton``) and run every query tile against it
(``triton_attention_quantized_kv``). Two passes over K because smoothing needs the mean over all
tokens before any token's scale is known; the V scale (a max over tokens) rides along in pass 1.

The attention kernel has the structure of ``triton_fa.py``: the mask as per-program loop bounds and
masked / unmasked stages, query-row ranges at ``q_offset``, GQA through ``h // G``, any strides for
q and ``out``, optional LSE. Per key block:

    s   = dot8(q8, k8^T) * q_scale[:, None] * k_scale[None, :]        (int32 -> fp32 exact, base 2)
    P8  = round(127 exp2(s - m_blk)) | fp8(448 exp2(s - m_blk))       (m_blk: the block's row max, or
                                                                       the running one: P_BLOCK_MAX)
    l   = l * alpha + rowsum(P8) * beta                               (beta = exp2(m_blk - m_new))
    acc = acc * alpha + dot8(P8, v8) * beta                           (a fresh accumulator per block;
                                                                       fp8 P8 and v8 go through an
                                                                       fp16 MMA, see _qattn_pv)
    out = acc * v_scale / l

``QK_FP8`` / ``PV_FP8`` (constexpr) pick e4m3 instead of int8 for each product: which is faster on a
given GPU is for scripts/bench_int8_attention.py to measure. fp8 needs compute capability >= 8.9.
V is stored transposed because 8-bit tensor-core MMAs on Hopper take only K-major operands: for
P @ V the reduction runs over keys, so keys must be contiguous.

Conversions: int32 -> fp32 and fp32 -> int8 are conversion instructions, which on Hopper issue at
about the rate of exp2 (a quarter of fp32 adds); done plainly, the int8 loop would spend four of
them per score where bf16 attention spends one exp2. So the loop converts with fp32 adds instead,
exact for |x| < 2^22 (scores: 127^2 * D_PAD <= 2^22 for head_dim <= 256): an int32 x becomes
``bits(x + 0x4B400000) - 1.5 * 2^23``, and P is ``exp2(s - (m - log2 127)) + 1.5 * 2^23``, whose
fp32 add rounds to the nearest integer (ties to even) and whose low byte then is the int8.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

from ..masks import Mask, MaskLike, resolve_mask
from . import quantized as qz
# shared with the bf16 kernel: the key range and stages, the device's index and shared memory, size buckets
from .triton_fa import (_index, _key_range, _pow2_bucket, block_visible, fixed_config, key_blocks, key_length,
                        launch_outputs, program_tile, prune_configs)
from .quantized import LOG2E, QuantizedKV

STATS_CHUNK = 256  # keys per program of pass 1
QUANT_BLOCK = 64   # keys per program of pass 3


@triton.jit
def _round_to_e4m3(x):
    """fp32 -> the nearest e4m3 value (ties to even, saturating at 448), still as fp32.

    Only for the interpreter: its own fp32 -> fp8e4nv cast (Triton 3.6) drops the carry when rounding
    reaches the next power of two (126 -> 64) and rounds subnormals wrongly; exact values it converts
    right. On the GPU the hardware cast (cvt.rn.satfinite) is used directly.
    """
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # below 2^-6 the subnormals share one spacing
    spacing = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3): 3 mantissa bits
    y = x / spacing  # exact: a power of two
    r = (y + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds y to an integer, ties to even
    return tl.minimum(tl.maximum(r * spacing, -448.0), 448.0)


@triton.jit
def _rint(x, INTERPRET: tl.constexpr):
    """Round to nearest, ties to even (torch.round). The interpreter has no libdevice: there, adding and
    subtracting 1.5 * 2^23 does it exactly for |x| < 2^22 (NumPy fuses nothing)."""
    if INTERPRET:
        y = (x + 12582912.0) - 12582912.0
    else:
        y = libdevice.rint(x)
    return y


@triton.jit
def _small_int_to_f32(x):
    """int32 |x| < 2^22 -> fp32, exactly, with an integer add and an fp32 add (see the module docstring)."""
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _inverse_scale(amax, R: tl.constexpr):
    """R / amax as quantized.inverse_scale: a correctly rounded reciprocal, then times R (fp32 ``/``
    is approximate on the GPU)."""
    return tl.math.div_rn(1.0, amax) * R


@triton.jit
def _to_8bit(x, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 already scaled to [-R, R] -> fp8 e4m3 or int8, both round to nearest, ties to even."""
    # one return per constexpr branch: Triton's code generator also visits a return after a static if,
    # and two return types fail to compile (the interpreter never sees it)
    if FP8:
        if INTERPRET:
            x = _round_to_e4m3(x)
        y = x.to(tl.float8e4nv)
    else:
        y = _rint(x, INTERPRET).to(tl.int8)
    return y


# ------------------------------------------------------------------------------------------------
# passes 1-3: K/V statistics and quantization
# ------------------------------------------------------------------------------------------------

# Sizes vary per call: no per-value specialisation (one compile serves every shape; Sk == 1 stays a tensor).
@triton.jit(do_not_specialize=["Sk", "Hkv", "n_chunks"])
def _kv_stats(K, V, KL, KSUM, VMAX, Sk, Hkv, n_chunks,
              stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
              CHUNK: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    kv_len = key_length(KL, b, Sk, HAS_KEY_LENGTHS)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    ksum = tl.zeros([D_PAD], tl.float64)  # fp64: the mean then rounds to the same fp32 as torch's
    vmax = tl.zeros([D_PAD], tl.float32)
    for i in range(0, CHUNK, BLOCK_S):
        rows = c * CHUNK + i + tl.arange(0, BLOCK_S)
        ok = (rows < kv_len)[:, None] & d_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        k = tl.load(k_base + r64 * stride_ks + d[None, :] * stride_kd, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_base + r64 * stride_vs + d[None, :] * stride_vd, mask=ok, other=0.0).to(tl.float32)
        ksum += tl.sum(k.to(tl.float64), 0)
        vmax = tl.maximum(vmax, tl.max(tl.abs(v), 0))
    out = (bh.to(tl.int64) * n_chunks + c) * D_PAD + d
    tl.store(KSUM + out, ksum)
    tl.store(VMAX + out, vmax)


@triton.jit(do_not_specialize=["Sk", "Hkv", "n_chunks"])
def _kv_finalize(KSUM, VMAX, KL, KMEAN, VSCALE, VINV, Sk, Hkv, n_chunks,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
                 SMOOTH: tl.constexpr, V_PER_HEAD: tl.constexpr, V_QMAX: tl.constexpr,
                 INTERPRET: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // Hkv
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    kv_len = key_length(KL, b, Sk, HAS_KEY_LENGTHS)
    ksum = tl.zeros([D_PAD], tl.float64)
    vmax = tl.zeros([D_PAD], tl.float32)
    base = bh.to(tl.int64) * n_chunks * D_PAD + d
    if INTERPRET:  # the interpreter cannot take a runtime bound in range(): same body, while loop
        c = 0
        while c < n_chunks:
            ksum += tl.load(KSUM + base + c * D_PAD)
            vmax = tl.maximum(vmax, tl.load(VMAX + base + c * D_PAD))
            c += 1
    else:
        for c in range(0, n_chunks):
            ksum += tl.load(KSUM + base + c * D_PAD)
            vmax = tl.maximum(vmax, tl.load(VMAX + base + c * D_PAD))
    if SMOOTH:
        mean = (ksum / kv_len.to(tl.float64)).to(tl.float32)
    else:
        mean = tl.zeros([D_PAD], tl.float32)
    if V_PER_HEAD:
        vmax = tl.zeros([D_PAD], tl.float32) + tl.max(vmax, 0)
    vmax = tl.maximum(vmax, 1e-30)  # an all-zero channel quantizes to zeros, not NaN
    out = bh.to(tl.int64) * HEAD_DIM + d
    tl.store(KMEAN + out, mean, mask=d_ok)
    tl.store(VSCALE + out, vmax * (1.0 / V_QMAX), mask=d_ok)
    tl.store(VINV + out, _inverse_scale(vmax, V_QMAX), mask=d_ok)


@triton.jit(do_not_specialize=["Sk", "Sk_pad", "Hkv"])
def _kv_quantize(K, V, KL, KMEAN, VINV, K8, KSC, VT, Sk, Sk_pad, Hkv,
                 stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
                 K_FP8: tl.constexpr, K_QMAX: tl.constexpr, V_FP8: tl.constexpr, BLOCK_S: tl.constexpr,
                 INTERPRET: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // Hkv
    hk = bh % Hkv
    kv_len = key_length(KL, b, Sk, HAS_KEY_LENGTHS)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    valid = rows < kv_len
    ok = valid[:, None] & d_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    stat = bh.to(tl.int64) * HEAD_DIM + d
    # K: smooth, then one scale per token; rows at or after the key length become zeros
    k = tl.load(k_base + r64 * stride_ks + d[None, :] * stride_kd, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(KMEAN + stat, mask=d_ok, other=0.0)
    ks = tl.where(valid[:, None], k - mean[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.abs(ks), 1), 1e-30)
    k8 = _to_8bit(ks * _inverse_scale(amax, K_QMAX)[:, None], K_FP8, INTERPRET)
    in_k = rows < Sk
    tl.store(K8 + (bh.to(tl.int64) * Sk + r64) * D_PAD + d[None, :], k8, mask=in_k[:, None])
    tl.store(KSC + bh.to(tl.int64) * Sk + rows, tl.where(valid, amax * (1.0 / K_QMAX), 0.0), mask=in_k)
    # V: the channel scales of pass 2; written transposed (keys contiguous), padding keys as zeros
    v = tl.load(v_base + r64 * stride_vs + d[None, :] * stride_vd, mask=ok, other=0.0).to(tl.float32)
    vinv = tl.load(VINV + stat, mask=d_ok, other=0.0)
    v8 = tl.trans(_to_8bit(v * vinv[None, :], V_FP8, INTERPRET))  # [D_PAD, BLOCK_S]
    vt_ptrs = VT + (bh.to(tl.int64) * D_PAD + d[:, None]) * Sk_pad + rows[None, :]
    tl.store(vt_ptrs, v8, mask=(rows < Sk_pad)[None, :])


# ------------------------------------------------------------------------------------------------
# pass 4: attention
# ------------------------------------------------------------------------------------------------

@triton.jit
def _qattn_scores(q8, sq, start_n, k_ptrs, ks_ptrs, k_desc, k_row0, lo, hi, q_pos, window,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, USE_TMA: tl.constexpr,
                  QK_FP8: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """The base-2 scores of key block [start_n, start_n + BLOCK_N) (-inf where masked) and which keys are in
    [lo, hi): 8-bit Q K^T, dequantised by the per-token scales."""
    k_pos = start_n + tl.arange(0, BLOCK_N)
    # keys outside [lo, hi) are invisible to every row: masked loads never read them
    kv_ok = (k_pos >= lo) & (k_pos < hi)
    if USE_TMA:
        k = k_desc.load([k_row0 + start_n, 0]).T  # rows past the head's keys are masked below
    elif MASKED:
        k = tl.load(k_ptrs + start_n * D_PAD, mask=kv_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * D_PAD)
    if MASKED:
        sk = tl.load(ks_ptrs + start_n, mask=kv_ok, other=0.0)
    else:
        sk = tl.load(ks_ptrs + start_n)
    if QK_FP8:
        qk = tl.dot(q8, k)
    else:
        qk = _small_int_to_f32(tl.dot(q8, k, out_dtype=tl.int32))  # |qk| <= 127^2 * D_PAD < 2^22
    s = qk * sq[:, None] * sk[None, :]
    if MASKED:
        s = tl.where(block_visible(kv_ok, k_pos, q_pos, window, IS_CAUSAL, HAS_WINDOW), s, float("-inf"))
    return s, kv_ok


@triton.jit
def _qattn_max(s, m_i, MASKED: tl.constexpr, P_BLOCK_MAX: tl.constexpr):
    """The online softmax's maxima for one block: (m_new, alpha = exp2(m_i - m_new), m_ref: the max P is
    quantized against, beta = exp2(m_block - m_new); beta is unused with the running max)."""
    m_blk = tl.max(s, 1)
    m_new = tl.maximum(m_i, m_blk)
    if MASKED:
        # a row that has seen nothing yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        if P_BLOCK_MAX:
            m_ref = tl.where(m_blk == float("-inf"), 0.0, m_blk)
            beta = tl.math.exp2(m_blk - m_use)
        else:
            m_ref = m_use
            beta = alpha
    else:
        alpha = tl.math.exp2(m_i - m_new)
        if P_BLOCK_MAX:
            m_ref = m_blk
            beta = tl.math.exp2(m_blk - m_new)
        else:
            m_ref = m_new
            beta = alpha
    return m_new, alpha, m_ref, beta


@triton.jit
def _qattn_p(s, m_ref, PV_FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """P at its fixed scale, R * exp2(s - m) as exp2(s - (m - log2 R)), as 8 bits, and its row sum (the
    quantized weights P @ V will use)."""
    if PV_FP8:
        p8 = _to_8bit(tl.math.exp2(s - (m_ref - 8.807354922057604)[:, None]), True, INTERPRET)  # log2(448)
        p_sum = tl.sum(p8.to(tl.float32), 1)
    else:
        y = tl.math.exp2(s - (m_ref - 6.9886846867721655)[:, None]) + 12582912.0  # log2(127); rounds to integer
        p_sum = tl.sum(y - 12582912.0, 1)
        p8 = y.to(tl.int32, bitcast=True).to(tl.int8)  # the low byte of 1.5 * 2^23 + n is n (0 <= n <= 127)
    return p8, p_sum


@triton.jit
def _qattn_pv(p8, start_n, vt_ptrs, v_desc, v_row0, kv_ok, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
              PV_FP8: tl.constexpr):
    """8-bit P @ V of one key block (V^T in memory: keys contiguous), as fp32."""
    if USE_TMA:
        v = v_desc.load([v_row0, start_n])  # [D_PAD, BLOCK_N]; beyond the keys: zeros (pass 3, TMA fill)
    elif MASKED:
        v = tl.load(vt_ptrs + start_n, mask=kv_ok[None, :], other=0.0)
    else:
        v = tl.load(vt_ptrs + start_n)
    if PV_FP8:  # else, not a second return: the code generator would build the int32 dot of fp8 operands too
        # fp16 MMA on the fp8 values (exact: every e4m3 value is an fp16 one). The e4m3 MMA with P as the
        # register operand gave non-finite and wrong rows, varying run to run, on an H200 with Triton 3.6
        # (an fp8 dot of loaded operands did not): correctness first, at the fp16 rate
        pv = tl.dot(p8.to(tl.float16), tl.trans(v).to(tl.float16))
    else:
        pv = _small_int_to_f32(tl.dot(p8, tl.trans(v), out_dtype=tl.int32))  # 127^2 * BLOCK_N < 2^22
    return pv


@triton.jit
def _qattn_block(carry, start_n, q8, sq, k_ptrs, ks_ptrs, vt_ptrs, k_desc, v_desc, k_row0, v_row0, lo, hi, q_pos,
                 window, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 USE_TMA: tl.constexpr, QK_FP8: tl.constexpr, PV_FP8: tl.constexpr, P_BLOCK_MAX: tl.constexpr,
                 BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, INTERPRET: tl.constexpr):
    """One key block [start_n, start_n + BLOCK_N): 8-bit scores, online softmax, 8-bit P @ V (the block_fn of
    triton_fa.key_blocks)."""
    acc, l_i, m_i = carry
    s, kv_ok = _qattn_scores(q8, sq, start_n, k_ptrs, ks_ptrs, k_desc, k_row0, lo, hi, q_pos, window, MASKED,
                             IS_CAUSAL, HAS_WINDOW, USE_TMA, QK_FP8, BLOCK_N, D_PAD)
    m_new, alpha, m_ref, beta = _qattn_max(s, m_i, MASKED, P_BLOCK_MAX)
    p8, p_sum = _qattn_p(s, m_ref, PV_FP8, INTERPRET)
    pv = _qattn_pv(p8, start_n, vt_ptrs, v_desc, v_row0, kv_ok, MASKED, USE_TMA, PV_FP8)
    if P_BLOCK_MAX:
        l_i = l_i * alpha + p_sum * beta
        acc = acc * alpha[:, None] + pv * beta[:, None]
    else:
        l_i = l_i * alpha + p_sum
        acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def _qattn_q_tile(Q, KMEAN, b, h, stat, offs_m, offs_d, d_ok, Sq, stride_qb, stride_qs, stride_qh, stride_qd,
                  qk_scale, QK_FP8: tl.constexpr, RETURN_LSE: tl.constexpr, INTERPRET: tl.constexpr):
    """The program's Q tile, quantized in registers with one scale per row (folding softmax scale and log2 e):
    (q8, its scales, the LSE's smoothing term q . mean in base 2 (zeros without an LSE))."""
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :] * stride_qd)
    qf = tl.load(q_ptrs, mask=(offs_m[:, None] < Sq) & d_ok[None, :], other=0.0).to(tl.float32)
    q_amax = tl.maximum(tl.max(tl.abs(qf), 1), 1e-30)
    if QK_FP8:
        q8 = _to_8bit(qf * _inverse_scale(q_amax, 448.0)[:, None], QK_FP8, INTERPRET)
        sq = q_amax * (1.0 / 448.0) * qk_scale
    else:
        q8 = _to_8bit(qf * _inverse_scale(q_amax, 127.0)[:, None], QK_FP8, INTERPRET)
        sq = q_amax * (1.0 / 127.0) * qk_scale
    lse_shift = tl.zeros_like(q_amax)
    if RETURN_LSE:
        # the scores are of smoothed keys: the LSE gets q . mean back (base 2), from the unquantized q
        # (the mean can be large: its product is the part of the score quantization would hurt most)
        k_mean = tl.load(KMEAN + stat, mask=d_ok, other=0.0)
        lse_shift = tl.sum(qf * k_mean[None, :], 1) * qk_scale
    return q8, sq, lse_shift


@triton.jit
def _qattn_epilogue(acc, l_i, m_i, lse_shift, O, LSE, VSC, stat, b, h, pid_bh, offs_m, offs_d, d_ok, Sq,
                    stride_ob, stride_os, stride_oh, stride_od, RETURN_LSE: tl.constexpr, PV_FP8: tl.constexpr):
    """The fixed P scale cancels in acc / l; rows with no visible key give 0 and lse -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    sv = tl.load(VSC + stat, mask=d_ok, other=0.0)
    o = acc * sv[None, :] / l_safe[:, None]
    o_ptrs = (O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < Sq) & d_ok[None, :])
    if RETURN_LSE:
        if PV_FP8:  # the fixed P scale back out: log2(448), log2(127)
            lse2 = m_i + tl.math.log2(l_safe) - 8.807354922057604 + lse_shift
        else:
            lse2 = m_i + tl.math.log2(l_safe) - 6.9886846867721655 + lse_shift
        lse = tl.where(l_i == 0.0, float("-inf"), lse2 * 0.6931471805599453)
        tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)


# Sizes and offsets vary per tile: no per-value specialisation (one compile serves every tile).
@triton.jit(do_not_specialize=["Sq", "Sk", "Sk_pad", "Hq", "Hkv", "G", "q_offset", "window",
                               "TUNE_Q", "TUNE_K", "TUNE_BH"])
def _qattn_fwd(Q, K8, KSC, KMEAN, VT, VSC, O, LSE, KL, k_desc, v_desc,
               stride_qb, stride_qs, stride_qh, stride_qd, stride_ob, stride_os, stride_oh, stride_od,
               Sq, Sk, Sk_pad, Hq, Hkv, G, q_offset, window, qk_scale,
               TUNE_Q, TUNE_K, TUNE_BH,  # autotune key only (bucketed sizes)
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_KEY_LENGTHS: tl.constexpr, RETURN_LSE: tl.constexpr, QK_FP8: tl.constexpr,
               PV_FP8: tl.constexpr, P_BLOCK_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               USE_TMA: tl.constexpr,
               INTERPRET: tl.constexpr = False):
    pid_bh, b, h, m0, offs_m, offs_n, offs_d, d_ok = program_tile(Hq, BLOCK_M, BLOCK_N, D_PAD, HEAD_DIM)
    bhk = b * Hkv + h // G
    q_pos = q_offset + offs_m
    # the key range from the mask description and its three stages, as the bf16 kernel's
    lo, hi, s1, e1, s2, e2 = _key_range(KL, b, Sq, Sk, q_offset, m0, window, HAS_KEY_LENGTHS, IS_CAUSAL, HAS_WINDOW,
                                        BLOCK_M, BLOCK_N)
    stat = bhk.to(tl.int64) * HEAD_DIM + offs_d
    q8, sq, lse_shift = _qattn_q_tile(Q, KMEAN, b, h, stat, offs_m, offs_d, d_ok, Sq, stride_qb, stride_qs,
                                      stride_qh, stride_qd, qk_scale, QK_FP8, RETURN_LSE, INTERPRET)

    k_ptrs = K8 + bhk.to(tl.int64) * Sk * D_PAD + offs_n[None, :] * D_PAD + offs_d[:, None]  # K^T [D_PAD, BLOCK_N]
    ks_ptrs = KSC + bhk.to(tl.int64) * Sk + offs_n
    vt_ptrs = VT + bhk.to(tl.int64) * D_PAD * Sk_pad + offs_d[:, None] * Sk_pad + offs_n[None, :]  # [D_PAD, BLOCK_N]
    k_row0 = bhk * Sk
    v_row0 = bhk * D_PAD

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # the bf16 kernel's three stages: masked (the window's left edge), whole unmasked blocks, masked (diagonal)
    ops = (q8, sq, k_ptrs, ks_ptrs, vt_ptrs, k_desc, v_desc, k_row0, v_row0, lo, hi, q_pos, window)
    carry = (acc, l_i, m_i)
    if HAS_WINDOW:
        carry = key_blocks(_qattn_block, carry, s1, e1, ops, (True, IS_CAUSAL, HAS_WINDOW, USE_TMA, QK_FP8, PV_FP8,
                                                               P_BLOCK_MAX, BLOCK_N, D_PAD, INTERPRET), BLOCK_N, INTERPRET)
    carry = key_blocks(_qattn_block, carry, s2, e2, ops, (False, IS_CAUSAL, HAS_WINDOW, USE_TMA, QK_FP8, PV_FP8,
                                                           P_BLOCK_MAX, BLOCK_N, D_PAD, INTERPRET), BLOCK_N, INTERPRET)
    acc, l_i, m_i = key_blocks(_qattn_block, carry, e2, hi, ops, (True, IS_CAUSAL, HAS_WINDOW, USE_TMA, QK_FP8,
                                                                   PV_FP8, P_BLOCK_MAX, BLOCK_N, D_PAD, INTERPRET),
                               BLOCK_N, INTERPRET)
    _qattn_epilogue(acc, l_i, m_i, lse_shift, O, LSE, VSC, stat, b, h, pid_bh, offs_m, offs_d, d_ok, Sq,
                    stride_ob, stride_os, stride_oh, stride_od, RETURN_LSE, PV_FP8)


# ------------------------------------------------------------------------------------------------
# Autotune: one config list per GPU family, pruned per call (shared memory, registers, short tiles).
# ------------------------------------------------------------------------------------------------

def _set_block_shapes(nargs):
    # TMA boxes follow the config's tiles; harmless for pointer configs (the descriptors go unused)
    if nargs.get("k_desc") is not None:
        nargs["k_desc"].block_shape = [nargs["BLOCK_N"], nargs["D_PAD"]]
        nargs["v_desc"].block_shape = [nargs["D_PAD"], nargs["BLOCK_N"]]


def _cfg(bm, bn, w, s, tma=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=w, num_stages=s,
                         pre_hook=_set_block_shapes)


def family_configs(major: int, d_pad: int = 128):
    """Autotune candidates for compute capability ``major`` (not measured yet: the benchmark script times
    each of them one by one, so the list can be cut to what wins)."""
    if d_pad >= 256:
        return [_cfg(64, 32, 4, 2), _cfg(64, 64, 4, 2), _cfg(128, 32, 8, 2)]
    if major >= 9:
        return [
            _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 64, 8, 4), _cfg(64, 64, 4, 3),
            _cfg(128, 128, 8, 3, True), _cfg(128, 64, 8, 3, True), _cfg(128, 128, 8, 2, True),
        ]
    return [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 128, 8, 2), _cfg(64, 32, 4, 4)]


def _prune(configs, nargs, **kw):
    # 1-byte tiles: Q (as the dot operand) and the pipelined K and V blocks, plus an fp32 layout-change scratch of
    # the score tile
    d = kw["D_PAD"]
    return prune_configs(configs, dict(nargs, **kw), nargs["k_desc"] is not None,
                         lambda bm, bn, stages: bm * d + max(stages - 1, 1) * 2 * bn * d + bm * bn * 4)


@functools.cache
def _capability_of(idx: int):
    return torch.cuda.get_device_capability(idx)


_KEY = ["TUNE_Q", "TUNE_K", "TUNE_BH", "HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_KEY_LENGTHS", "RETURN_LSE",
        "QK_FP8", "PV_FP8", "P_BLOCK_MAX"]
_TUNERS = {}


def _tuner(major: int, d_pad: int):
    fam = (major, d_pad >= 256)
    if fam not in _TUNERS:
        _TUNERS[fam] = triton.autotune(configs=family_configs(major, d_pad), key=_KEY,
                                       prune_configs_by={"early_config_prune": _prune})(_qattn_fwd)
    return _TUNERS[fam]


# Under TRITON_INTERPRET=1 (CPU tensors) one small config keeps tests fast; tests may change it.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "USE_TMA": False}
# FASTATTN_INT8_CONFIG="BM,BN,warps,stages[,tma]" pins one config on the GPU (skips autotuning).
_ENV_CONFIG = "FASTATTN_INT8_CONFIG"

# Whether the kernels were built for Triton's CPU interpreter (decided when @triton.jit ran: TRITON_INTERPRET=1)
INTERPRETED = type(_qattn_fwd).__name__ == "InterpretedFunction"


MAX_HEAD_DIM = 256  # 127^2 * head_dim must stay below 2^22 (the loop's exact int32 -> fp32)


def _check_device(t: torch.Tensor, precision: str) -> None:
    if t.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the 8-bit triton kernel takes head_dim <= {MAX_HEAD_DIM}, got {t.shape[-1]}")
    if t.device.type != "cuda":
        if not INTERPRETED:
            raise RuntimeError("the 8-bit triton kernel runs on CUDA tensors, or on CPU tensors under "
                               "TRITON_INTERPRET=1 (set before fastattn_dist.attention.triton_int8 is imported)")
        return
    cap = _capability_of(_index(t.device))
    if cap < (8, 0):
        raise RuntimeError(f"the 8-bit triton kernel needs compute capability >= 8.0, got {cap}")
    if "fp8" in precision and cap < (8, 9):
        raise ValueError(f"precision {precision!r} needs fp8 tensor cores (compute capability >= 8.9), got {cap}; "
                         "use precision='int8'")


def _device_ctx(t: torch.Tensor):
    # launches go to the current device: switch only when the tensor lives elsewhere
    switch = t.device.type == "cuda" and t.device.index not in (None, torch.cuda.current_device())
    return torch.cuda.device(t.device) if switch else contextlib.nullcontext()


def quantize_kv_triton(k: torch.Tensor, v: torch.Tensor, *, precision: str = "int8", smooth_k: bool = True,
                       key_lengths: Optional[torch.Tensor] = None, v_granularity: str = "channel") -> QuantizedKV:
    """Passes 1-3 on the device: the same ``QuantizedKV`` as ``quantized.quantize_kv`` (same integers)."""
    qk_fmt, pv_fmt = qz.formats(precision)
    if v_granularity not in qz.V_GRANULARITIES:
        raise ValueError(f"v_granularity must be one of {', '.join(qz.V_GRANULARITIES)}, got {v_granularity!r}")
    if not isinstance(smooth_k, bool):
        raise ValueError(f"smooth_k must be a bool, got {smooth_k!r}")
    qz.check_inputs(k, k, v, precision)
    _check_device(k, precision)
    B, Sk, Hkv, D = k.shape
    dp, skp = qz.padded_head_dim(D), qz.padded_keys(Sk)
    dev = k.device
    kl = None if key_lengths is None else key_lengths.to(device=dev)
    kl_arg = kl if kl is not None else k
    n_chunks = triton.cdiv(Sk, STATS_CHUNK)
    k8_dtype = torch.int8 if qk_fmt == "int8" else qz.FP8
    v8_dtype = torch.int8 if pv_fmt == "int8" else qz.FP8
    ksum = torch.empty(B * Hkv, n_chunks, dp, dtype=torch.float64, device=dev)
    vmax = torch.empty(B * Hkv, n_chunks, dp, dtype=torch.float32, device=dev)
    k_mean = torch.empty(B, Hkv, D, dtype=torch.float32, device=dev)
    v_scale = torch.empty(B, Hkv, D, dtype=torch.float32, device=dev)
    v_inv = torch.empty(B, Hkv, D, dtype=torch.float32, device=dev)
    k8 = torch.empty(B, Hkv, Sk, dp, dtype=k8_dtype, device=dev)
    k_scale = torch.empty(B, Hkv, Sk, dtype=torch.float32, device=dev)
    v_t = torch.empty(B, Hkv, dp, skp, dtype=v8_dtype, device=dev)
    strides = (*k.stride(), *v.stride())
    with _device_ctx(k):
        _kv_stats[(B * Hkv, n_chunks)](k, v, kl_arg, ksum, vmax, Sk, Hkv, n_chunks, *strides,
                                        HEAD_DIM=D, D_PAD=dp, HAS_KEY_LENGTHS=kl is not None,
                                        CHUNK=STATS_CHUNK, BLOCK_S=QUANT_BLOCK)
        _kv_finalize[(B * Hkv,)](ksum, vmax, kl_arg, k_mean, v_scale, v_inv, Sk, Hkv, n_chunks,
                                 HEAD_DIM=D, D_PAD=dp, HAS_KEY_LENGTHS=kl is not None, SMOOTH=smooth_k,
                                 V_PER_HEAD=v_granularity == "head", V_QMAX=qz.qmax(pv_fmt), INTERPRET=INTERPRETED)
        _kv_quantize[(B * Hkv, triton.cdiv(skp, QUANT_BLOCK))](
            k, v, kl_arg, k_mean, v_inv, k8, k_scale, v_t, Sk, skp, Hkv, *strides,
            HEAD_DIM=D, D_PAD=dp, HAS_KEY_LENGTHS=kl is not None, K_FP8=qk_fmt == "fp8", K_QMAX=qz.qmax(qk_fmt),
            V_FP8=pv_fmt == "fp8", BLOCK_S=QUANT_BLOCK, INTERPRET=INTERPRETED)
    return QuantizedKV(k8, k_scale, k_mean, v_t, v_scale, qk_fmt, pv_fmt, D, Sk)


def _tma_descs(kv: QuantizedKV):
    """2-D descriptors over K8 rows [B*Hkv*Sk, Dp] and V^T rows [B*Hkv*Dp, Skp] (both contiguous by
    construction), or (None, None) without TMA support. Boxes are set per config (``_set_block_shapes``)."""
    if TensorDescriptor is None:
        return None, None
    B, Hkv, Sk, dp = kv.k.shape
    skp = kv.v_t.shape[3]
    k2 = kv.k.view(B * Hkv * Sk, dp)
    v2 = kv.v_t.view(B * Hkv * dp, skp)
    return (TensorDescriptor(k2, list(k2.shape), [dp, 1], [16, dp]),
            TensorDescriptor(v2, list(v2.shape), [skp, 1], [dp, 16]))


def _pinned_config(interp: bool, config: Optional[dict]):
    """The caller's config, else the interpreter's or FASTATTN_INT8_CONFIG's (None: autotune)."""
    return dict(config) if config is not None else fixed_config(interp, _ENV_CONFIG, INTERPRET_CONFIG)


def _check_quantized_call(q: torch.Tensor, kv: QuantizedKV, out, q_offset, p_max: str) -> None:
    """ValueError unless q [B, Sq, Hq, D] fits ``kv`` and the device runs its formats."""
    if not isinstance(kv, QuantizedKV):
        raise ValueError(f"kv must be a QuantizedKV (quantize_kv_triton / quantize_kv), got {type(kv).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.dtype not in qz.INPUT_DTYPES:
        raise ValueError("q must be a 4-D fp16, bf16 or fp32 tensor [batch, seq, heads, head_dim]")
    B, Sq, Hq, D = q.shape
    Hkv = kv.k.shape[1]
    bad = [n for n in ("k", "k_scale", "k_mean", "v_t", "v_scale") if not getattr(kv, n).is_contiguous()]
    if bad:  # the kernel computes their addresses from the shapes
        raise ValueError(f"QuantizedKV tensors must be contiguous (as quantize_kv / quantize_kv_triton make them): {bad}")
    if kv.k.shape[0] != B or kv.head_dim != D or Hq % Hkv or kv.k.device != q.device:
        raise ValueError(f"q {list(q.shape)} on {q.device} does not fit the quantized K/V "
                         f"(batch {kv.k.shape[0]}, kv heads {Hkv}, head_dim {kv.head_dim}, on {kv.k.device})")
    _check_device(q, qz.precision_of(kv))
    qz.check_out(out, q)
    qz.check_p_max(p_max)
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be an int >= 0, got {q_offset!r}")


def triton_attention_quantized_kv(q: torch.Tensor, kv: QuantizedKV, mask: Mask, *, q_offset: int = 0,
                                  scale: Optional[float] = None, return_lse: bool = False,
                                  out: Optional[torch.Tensor] = None, config: Optional[dict] = None,
                                  p_max: str = "block"):
    """Pass 4 alone: q [B, Sq, Hq, D] (16/32 bit, any strides; quantized in the kernel) against a
    QuantizedKV. ``config``: {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA"} pins the
    launch (the benchmark times configs this way); otherwise autotuned on the GPU."""
    _check_quantized_call(q, kv, out, q_offset, p_max)
    B, Sq, Hq, D = q.shape
    _, Hkv, Sk, dp = kv.k.shape
    sm = qz.softmax_scale(scale, D)
    interp = q.device.type != "cuda"
    out, lse, kl, window = launch_outputs(q, mask, out, return_lse)
    args = (q, kv.k, kv.k_scale, kv.k_mean, kv.v_t, kv.v_scale, out, lse if lse is not None else out,
            kl if kl is not None else out)
    strides = (*q.stride(), *out.stride())
    meta = dict(HEAD_DIM=D, D_PAD=dp, IS_CAUSAL=bool(mask.causal), HAS_WINDOW=window > 0,
                HAS_KEY_LENGTHS=kl is not None, RETURN_LSE=return_lse, QK_FP8=kv.qk_fmt == "fp8",
                PV_FP8=kv.pv_fmt == "fp8", P_BLOCK_MAX=p_max == "block")
    scalars = (Sq, Sk, kv.v_t.shape[3], Hq, Hkv, Hq // Hkv, int(q_offset), int(window), sm * LOG2E,
               _pow2_bucket(Sq), _pow2_bucket(Sk), _pow2_bucket(B * Hq))

    def grid(m):
        return (B * Hq, triton.cdiv(Sq, m["BLOCK_M"]))

    fixed = _pinned_config(interp, config)
    major = 0 if interp else _capability_of(_index(q.device))[0]
    descs = (None, None)
    if (fixed is None and major >= 9) or (fixed is not None and fixed.get("USE_TMA")):
        descs = _tma_descs(kv)
    with _device_ctx(q):
        if fixed is not None:
            fixed["USE_TMA"] = bool(fixed.get("USE_TMA")) and descs[0] is not None
            if not fixed["USE_TMA"]:
                descs = (None, None)
            _set_block_shapes({"k_desc": descs[0], "v_desc": descs[1], "BLOCK_N": fixed["BLOCK_N"], "D_PAD": dp})
            _qattn_fwd[grid](*args, *descs, *strides, *scalars, **meta, **fixed, INTERPRET=interp)
        else:
            _tuner(major, dp)[grid](*args, *descs, *strides, *scalars, **meta)
    if return_lse:
        return out, lse
    return out


def triton_quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike = "causal", *,
                               q_offset: int = 0, precision: str = "int8", smooth_k: bool = True,
                               return_lse: bool = False, out: Optional[torch.Tensor] = None,
                               scale: Optional[float] = None, v_granularity: str = "channel",
                               config: Optional[dict] = None, p_max: str = "block"):
    """8-bit attention on the device, the ``attention()`` contract: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]
    (fp16/bf16/fp32, any strides), any mask, ``q_offset``, ``out`` (a strided view is fine), LSE
    [B, Hq, Sq] fp32 natural log. Quantizes K/V (passes 1-3), then runs the attention kernel."""
    qz.check_inputs(q, k, v, precision, q_offset)
    qz.check_out(out, q)
    qz.check_p_max(p_max)
    m = resolve_mask(mask)
    m.validate(q.shape[0], k.shape[1])
    _check_device(q, precision)
    kv = quantize_kv_triton(k, v, precision=precision, smooth_k=smooth_k, key_lengths=m.key_lengths,
                            v_granularity=v_granularity)
    return triton_attention_quantized_kv(q, kv, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out,
                                         config=config, p_max=p_max)
