"""8-bit attention (INT-FlashAttention / SageAttention style): the quantization math and a torch model of the kernel.

Scheme (the same in ``triton_int8.py``; ``precision`` picks the 8-bit format of each product):

* **Q**: one scale per token (per row and head): ``q8 = round(q * (R / amax_row))``, R = 127 (int8)
  or 448 (fp8 e4m3's largest value). The dequant factor stored with it, ``amax_row / R * scale * log2(e)``,
  also carries the softmax scale and the base change, so a dequantised score is already in base 2.
* **K**: smoothed first (``smooth_k``, SageAttention): the per-channel mean over the keys of each
  (batch, kv head) is subtracted. ``q . (k_j - mean)`` differs from ``q . k_j`` by a per-row constant,
  which softmax ignores; what it removes are channel offsets that would otherwise set every key's
  per-token scale (``amax_row`` of a key with a 10-sigma channel offset is ~10 sigma). Then one
  scale per token, as Q. The LSE is corrected back by that constant (``q . mean``, from the unquantized
  q: the mean can be large, and its product is where Q's rounding would cost most), so LSEs stay
  mergeable with other kernels' results.
* **V**: one scale per channel (``v_granularity="channel"``: the max over the keys of each channel of each
  (batch, kv head)) or one per (batch, kv head) (``"head"``). A channel scale factors out of the sum over
  keys, so it costs the kernel one multiply per output element, as a head scale would, and is never
  coarser.
* **P**: inside the online softmax, ``p = exp2(s - m)`` lies in [0, 1] and is quantized at a fixed
  scale: ``round(127 p)`` (int8) or ``fp8(448 p)``, computed as ``exp2(s - (m - log2 R))`` (the scale
  folded into the exponent: no multiply, and the kernel's rounding is one fp32 add, see
  triton_int8.py). ``p_max`` says which max m is:
  "running" (INT-FlashAttention as published: the running row max, this block included) or
  "block" (the default: this key block's row max; the block's P @ V and row sum are then scaled by
  ``exp2(m_block - m_running)`` in fp32). With the running max, a long flat softmax puts most
  weights below 1/254, where int8 rounds them to 0 or 1: on rows that see 32K keys the running
  max gives 0.051 relative error, the block max 0.0195, flat in the number of keys (0.0175 at 256;
  head_dim 128, keys with channel outliers, smoothed).
  It costs one exp2 per row and one multiply per accumulator element per block. The row sum ``l``
  is taken over the quantized P, so the normalisation uses the weights P @ V used (and the fixed
  scale cancels: ``out = acc * v_scale / l``).
* **Products**: int8 x int8 -> int32 (exact) or fp8 x fp8 -> fp32, dequantised with the scales.

``precision``:  "int8"      QK^T int8, PV int8 (INT-FlashAttention)
                "fp8"       QK^T fp8 e4m3, PV fp8 e4m3 (same scales, R = 448)
                "int8-fp8"  QK^T int8, PV fp8 e4m3 (SageAttention2's split)

Statistics (K mean, V scale) are taken over the keys ``[0, key_length)`` of each sequence (all ``Sk``
without key lengths): a property of K and V alone, so one quantized K/V serves every query tile of a
block. Key rows at or after the key length are written as zeros (garbage there cannot reach the
scales or the output).

Bit-exact by construction: the Triton passes compute the same fp32 operations, chosen so that no
implementation can round them differently: ``x * (R * rcp(amax))`` with a correctly rounded
reciprocal (torch's ``scalar / tensor`` is reciprocal-times-scalar, Triton's fp32 ``/`` on the GPU
is approximate), scales as ``amax * (1 / R)``, int8 by round-half-even of the fp32 product (one
``rint`` on the GPU: nothing for the compiler to fuse into an FMA), the K mean summed in fp64.

``quantized_attention_torch`` runs the kernel's arithmetic in torch, key block by key block (the P
quantization depends on the running max, so the block size is part of the result): integer products
in float64 (exact), everything else in float32 in the kernel's order. It is the model CI tests the
numerics against; ``naive_fp8_attention_torch`` is the baseline it is measured against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..masks import Mask, MaskLike, resolve_mask
from .checks import check_qkv
from .reference import reference_attention

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
PRECISIONS = ("int8", "fp8", "int8-fp8")
P_MAXES = ("block", "running")
V_GRANULARITIES = ("channel", "head")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8 = torch.float8_e4m3fn
INT8_MAX = 127.0
FP8_MAX = 448.0
DEFAULT_BLOCK_N = 64  # the torch model's key block; pass the kernel's BLOCK_N to compare bit for bit
TINY = 1e-30  # amax floor: an all-zero row quantizes to zeros instead of NaN


def formats(precision: str):
    """(QK^T format, PV format), each "int8" or "fp8", for a ``precision`` name; ValueError if unknown."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return {"int8": ("int8", "int8"), "fp8": ("fp8", "fp8"), "int8-fp8": ("int8", "fp8")}[precision]


def precision_of(kv: "QuantizedKV") -> str:
    """The ``precision`` name of a QuantizedKV's formats."""
    return {("int8", "int8"): "int8", ("fp8", "fp8"): "fp8", ("int8", "fp8"): "int8-fp8"}[(kv.qk_fmt, kv.pv_fmt)]


def check_p_max(p_max: str) -> None:
    if p_max not in P_MAXES:
        raise ValueError(f"p_max must be one of {', '.join(P_MAXES)}, got {p_max!r}")


def qmax(fmt: str) -> float:
    return INT8_MAX if fmt == "int8" else FP8_MAX


def padded_head_dim(d: int) -> int:
    """The kernel's head_dim: a power of two >= 32 (8-bit tensor-core dots need K >= 32); zeros beyond d."""
    return max(32, 1 << (d - 1).bit_length())


def padded_keys(sk: int) -> int:
    """Row length of the transposed V: a multiple of 16 keys (16-byte aligned rows for vector loads / TMA)."""
    return (sk + 15) // 16 * 16


@dataclass
class QuantizedQ:
    """``q`` [B, Hq, Sq, D] int8 or fp8; ``scale`` [B, Hq, Sq] fp32, times softmax scale * log2(e)."""

    q: torch.Tensor
    scale: torch.Tensor
    fmt: str


@dataclass
class QuantizedKV:
    """K and V in the kernel's layout (zero padded; see the module docstring for the scales).

    k [B, Hkv, Sk, Dp], k_scale [B, Hkv, Sk] fp32, k_mean [B, Hkv, D] fp32 (zeros without smoothing),
    v_t [B, Hkv, Dp, Skp] (V transposed: keys contiguous, the K-major operand 8-bit tensor-core dots
    want), v_scale [B, Hkv, D] fp32 (per head: the same value in every channel). Dp =
    ``padded_head_dim(D)``, Skp = ``padded_keys(Sk)``.
    """

    k: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    v_t: torch.Tensor
    v_scale: torch.Tensor
    qk_fmt: str
    pv_fmt: str
    head_dim: int
    seq_k: int


# ------------------------------------------------------------------------------------------------
# validation (ValueError for everything: shapes, dtypes, options)
# ------------------------------------------------------------------------------------------------

def check_inputs(q, k, v, precision: str, q_offset: int = 0) -> None:
    formats(precision)
    check_qkv(q, k, v, dtypes=INPUT_DTYPES, what="quantized attention", type_error=ValueError)
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be an int >= 0, got {q_offset!r}")


def check_out(out, q) -> None:
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):
        raise ValueError(f"out must be a {q.dtype} tensor of shape {list(q.shape)} on {q.device}")


def softmax_scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    return float(scale)


# ------------------------------------------------------------------------------------------------
# quantization
# ------------------------------------------------------------------------------------------------

def to_format(x_scaled: torch.Tensor, fmt: str) -> torch.Tensor:
    """An fp32 tensor already scaled to [-R, R] -> int8 or fp8 e4m3, both round to nearest, ties to even."""
    if fmt == "int8":
        return torch.round(x_scaled).to(torch.int8)
    return x_scaled.to(FP8)


def inverse_scale(amax: torch.Tensor, r: float) -> torch.Tensor:
    """R / amax as the kernels compute it: a correctly rounded reciprocal, then times R."""
    return torch.reciprocal(amax) * r


def quantize_rows(x: torch.Tensor, fmt: str):
    """Per-row (last dim) symmetric quantization of an fp32 tensor -> (x8, dequant scale amax / R)."""
    r = qmax(fmt)
    amax = x.abs().amax(-1).clamp_min(TINY)
    return to_format(x * inverse_scale(amax, r)[..., None], fmt), amax * (1.0 / r)


def quantize_q(q: torch.Tensor, *, precision: str = "int8", scale: Optional[float] = None) -> QuantizedQ:
    """q [B, Sq, Hq, D] -> int8/fp8 [B, Hq, Sq, D] with per-token scales (times softmax scale * log2 e)."""
    fmt = formats(precision)[0]
    sm = softmax_scale(scale, q.shape[3])
    q8, s = quantize_rows(q.float().transpose(1, 2), fmt)
    return QuantizedQ(q8.contiguous(), (s * (sm * LOG2E)).contiguous(), fmt)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, *, precision: str = "int8", smooth_k: bool = True,
                key_lengths: Optional[torch.Tensor] = None, v_granularity: str = "channel") -> QuantizedKV:
    """k, v [B, Sk, Hkv, D] -> QuantizedKV (statistics over keys [0, key_lengths[b]), zeros beyond)."""
    qk_fmt, pv_fmt = formats(precision)
    if v_granularity not in V_GRANULARITIES:
        raise ValueError(f"v_granularity must be one of {', '.join(V_GRANULARITIES)}, got {v_granularity!r}")
    if not isinstance(smooth_k, bool):
        raise ValueError(f"smooth_k must be a bool, got {smooth_k!r}")
    B, Sk, Hkv, D = k.shape
    dp, skp = padded_head_dim(D), padded_keys(Sk)
    lens = (torch.full((B,), Sk, dtype=torch.int32, device=k.device) if key_lengths is None
            else key_lengths.to(device=k.device, dtype=torch.int32).clamp(max=Sk))
    valid = torch.arange(Sk, device=k.device)[None, :] < lens[:, None]          # [B, Sk]
    vmask = valid[:, None, :, None]                                             # [B, 1, Sk, 1]
    kf = torch.where(vmask, k.float().transpose(1, 2), 0.0)                     # [B, Hkv, Sk, D]
    vf = torch.where(vmask, v.float().transpose(1, 2), 0.0)
    if smooth_k:  # summed in float64 (as the Triton pass does): the fp32 mean does not depend on the order
        k_mean = (kf.double().sum(2) / lens.double()[:, None, None]).float()
    else:
        k_mean = torch.zeros(B, Hkv, D, device=k.device)
    ks = torch.where(vmask, kf - k_mean[:, :, None, :], 0.0)
    k8, k_scale = quantize_rows(ks, qk_fmt)
    k_scale = torch.where(valid[:, None, :], k_scale, 0.0)
    r = qmax(pv_fmt)
    v_amax = vf.abs().amax(2)                                                   # [B, Hkv, D]
    if v_granularity == "head":
        v_amax = v_amax.amax(-1, keepdim=True).expand(B, Hkv, D)
    v_amax = v_amax.clamp_min(TINY)
    v8 = to_format(vf * inverse_scale(v_amax, r)[:, :, None, :], pv_fmt)       # [B, Hkv, Sk, D]
    k_out = torch.zeros(B, Hkv, Sk, dp, dtype=k8.dtype, device=k.device)
    k_out[..., :D] = k8
    v_t = torch.zeros(B, Hkv, dp, skp, dtype=v8.dtype, device=k.device)
    v_t[:, :, :D, :Sk] = v8.transpose(2, 3)
    return QuantizedKV(k_out, k_scale, k_mean, v_t, (v_amax * (1.0 / r)).contiguous(), qk_fmt, pv_fmt, D, Sk)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, smooth_k: bool = True,
                 precision: str = "int8", scale: Optional[float] = None, key_lengths: Optional[torch.Tensor] = None,
                 v_granularity: str = "channel"):
    """(QuantizedQ, QuantizedKV) for q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (see the module docstring)."""
    check_inputs(q, k, v, precision)
    return (quantize_q(q, precision=precision, scale=scale),
            quantize_kv(k, v, precision=precision, smooth_k=smooth_k, key_lengths=key_lengths,
                        v_granularity=v_granularity))


def quantize_p(p_scaled: torch.Tensor, fmt: str):
    """Softmax numerators already at the fixed scale, in [0, R] -> (8-bit P, the same values as fp32)."""
    if fmt == "int8":
        pq = torch.round(p_scaled)
        return pq, pq
    p8 = p_scaled.to(FP8)
    return p8, p8.float()


# ------------------------------------------------------------------------------------------------
# the kernel's arithmetic in torch
# ------------------------------------------------------------------------------------------------

def _visible(mask: Mask, q_pos: torch.Tensor, k_pos: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, Sq, n] visibility of one key block: the mask's causality and window, every sequence's ``lens``."""
    return Mask(mask.causal, mask.window, lens).visible(q_pos, k_pos)[:, None, None]


def _key_block(state, qd, sq, kv: QuantizedKV, ks: int, ke: int, mask: Mask, q_pos, lens, p_max: str):
    """One aligned key block [ks, ke) of the kernel's loop: 8-bit scores, online softmax, 8-bit P @ V.
    ``state`` = (m, l, acc), [B, Hkv, G, Sq(, D)]; returns the updated state."""
    m, l, acc = state
    D, dev = kv.head_dim, qd.device
    kb = kv.k[:, :, None, ks:ke, :D].double()                                    # [B, Hkv, 1, n, D]
    qk = (qd @ kb.transpose(-1, -2)).float()                                     # exact integers (int8)
    s = qk * sq[..., None] * kv.k_scale[:, :, None, None, ks:ke]
    vis = _visible(mask, q_pos, torch.arange(ks, ke, device=dev), lens)
    s = torch.where(vis, s, float("-inf"))
    m_blk = s.amax(-1)
    m_new = torch.maximum(m, m_blk)
    m_use = torch.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp2 gives 0, not NaN
    alpha = torch.exp2(m - m_use)
    if p_max == "block":
        m_ref = torch.where(m_blk == float("-inf"), 0.0, m_blk)
        beta = torch.exp2(m_blk - m_use)
    else:
        m_ref = m_use
    # R * exp2(s - m) as exp2(s - (m - log2 R)), the kernel's form
    p8, pq = quantize_p(torch.exp2(s - (m_ref - math.log2(qmax(kv.pv_fmt)))[..., None]), kv.pv_fmt)
    vb = kv.v_t[:, :, None, :D, ks:ke].double().transpose(-1, -2)                # [B, Hkv, 1, n, D]
    pv = (pq.double() @ vb).float()
    if p_max == "block":
        l = l * alpha + pq.sum(-1) * beta
        acc = acc * alpha[..., None] + pv * beta[..., None]
    else:
        l = l * alpha + pq.sum(-1)
        acc = acc * alpha[..., None] + pv
    return m_new, l, acc


def _lse_of(m, l, kv: QuantizedKV, q: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """The natural-log LSE [B, Hkv, G, Sq] of the unsmoothed scores: the loop's base-2 m + log2 l, the fixed P
    scale back out, and + q . mean (base 2) from the unquantized ``q`` [B, Sq, Hq, D]."""
    B, Hkv, G, Sq = m.shape
    D = kv.head_dim
    l_safe = torch.where(l == 0, 1.0, l)
    qf = q.float().transpose(1, 2).reshape(B, Hkv, G, Sq, D)
    shift = (qf * kv.k_mean[:, :, None, None, :]).sum(-1) * (softmax_scale(scale, D) * LOG2E)
    lse2 = m + torch.log2(l_safe) - math.log2(qmax(kv.pv_fmt)) + shift
    return torch.where(l == 0, float("-inf"), lse2 * LN2)


def attention_from_quantized(qq: QuantizedQ, kv: QuantizedKV, mask: Mask, *, q_offset: int = 0,
                             out_dtype=torch.float32, return_lse: bool = False, block_n: int = DEFAULT_BLOCK_N,
                             key_lengths: Optional[torch.Tensor] = None, q: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None, p_max: str = "block"):
    """The kernel's loop over aligned key blocks of ``block_n`` for all rows at once.

    Returns out [B, Sq, Hq, D] (``out_dtype``) and, with ``return_lse``, lse [B, Hq, Sq] fp32; the LSE
    needs the unquantized ``q`` [B, Sq, Hq, D] (and the ``scale`` it was quantized with) for its
    smoothing term.
    """
    check_p_max(p_max)
    if return_lse and q is None:
        raise ValueError("the LSE needs the unquantized q (its smoothing term q . mean)")
    B, Hq, Sq, D = qq.q.shape
    Hkv, Sk = kv.k.shape[1], kv.seq_k
    G = Hq // Hkv
    dev = qq.q.device
    lens = (torch.full((B,), Sk, dtype=torch.int32, device=dev) if key_lengths is None
            else key_lengths.to(device=dev, dtype=torch.int32).clamp(max=Sk))
    # [B, Hkv, G, Sq, *]: one matmul per block serves a GQA group
    qd = qq.q.view(B, Hkv, G, Sq, D).double()
    sq = qq.scale.view(B, Hkv, G, Sq)
    state = (torch.full((B, Hkv, G, Sq), float("-inf"), device=dev), torch.zeros(B, Hkv, G, Sq, device=dev),
             torch.zeros(B, Hkv, G, Sq, D, device=dev))
    q_pos = torch.arange(Sq, device=dev) + q_offset
    for ks in range(0, Sk, block_n):
        state = _key_block(state, qd, sq, kv, ks, min(ks + block_n, Sk), mask, q_pos, lens, p_max)
    m, l, acc = state
    l_safe = torch.where(l == 0, 1.0, l)
    o = acc * kv.v_scale[:, :, None, None, :] / l_safe[..., None]
    out = o.view(B, Hq, Sq, D).transpose(1, 2).to(out_dtype)
    if not return_lse:
        return out
    return out, _lse_of(m, l, kv, q, scale).view(B, Hq, Sq)


def quantized_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike = "causal", *,
                              q_offset: int = 0, precision: str = "int8", smooth_k: bool = True,
                              return_lse: bool = False, out: Optional[torch.Tensor] = None,
                              scale: Optional[float] = None, block_n: int = DEFAULT_BLOCK_N,
                              v_granularity: str = "channel", p_max: str = "block"):
    """8-bit attention in torch with the Triton kernel's arithmetic; the ``attention()`` contract.

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (fp16/bf16/fp32), any mask, ``q_offset``, ``out`` (a strided
    view is fine), ``return_lse`` (natural log, [B, Hq, Sq] fp32, of the unquantized-score convention).
    """
    check_inputs(q, k, v, precision, q_offset)
    check_out(out, q)
    check_p_max(p_max)
    m = resolve_mask(mask)
    m.validate(q.shape[0], k.shape[1])
    kv = quantize_kv(k, v, precision=precision, smooth_k=smooth_k, key_lengths=m.key_lengths,
                     v_granularity=v_granularity)
    return attention_quantized_kv_torch(q, kv, m, q_offset=q_offset, scale=scale, return_lse=return_lse, out=out,
                                        block_n=block_n, p_max=p_max)


def attention_quantized_kv_torch(q: torch.Tensor, kv: QuantizedKV, mask: Mask, *, q_offset: int = 0,
                                 scale: Optional[float] = None, return_lse: bool = False,
                                 out: Optional[torch.Tensor] = None, block_n: int = DEFAULT_BLOCK_N,
                                 p_max: str = "block"):
    """``triton_int8.triton_attention_quantized_kv`` in torch: q [B, Sq, Hq, D] (quantized here, per row)
    against K/V quantized once (``quantize_kv``), so row tiles of one call share one quantization."""
    if isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 1:
        raise ValueError(f"block_n must be an int >= 1, got {block_n!r}")
    qq = quantize_q(q, precision=precision_of(kv), scale=scale)
    res = attention_from_quantized(qq, kv, mask, q_offset=q_offset, out_dtype=q.dtype, return_lse=return_lse,
                                   block_n=block_n, key_lengths=mask.key_lengths, q=q, scale=scale, p_max=p_max)
    o = res[0] if return_lse else res
    if out is not None:
        out.copy_(o)
        o = out
    return (o, res[1]) if return_lse else o


def batch_slice(kv: QuantizedKV, b0: int, b1: int) -> QuantizedKV:
    """Sequences b0..b1-1 of ``kv`` (views: statistics are per sequence, so the slice is their quantization)."""
    return QuantizedKV(kv.k[b0:b1], kv.k_scale[b0:b1], kv.k_mean[b0:b1], kv.v_t[b0:b1], kv.v_scale[b0:b1],
                       kv.qk_fmt, kv.pv_fmt, kv.head_dim, kv.seq_k)


def naive_fp8_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike = "causal", *,
                              q_offset: int = 0, return_lse: bool = False, out: Optional[torch.Tensor] = None,
                              scale: Optional[float] = None):
    """Baseline: Q, K, V each rounded to fp8 e4m3 with one scale per tensor (amax / 448), then exact
    attention (float64) on the dequantised values. Only the input rounding is lossy (P is not quantized)."""
    check_inputs(q, k, v, "fp8", q_offset)
    check_out(out, q)
    m = resolve_mask(mask)
    m.validate(q.shape[0], k.shape[1])

    def fp8_roundtrip(x):
        s = x.double().abs().amax().clamp_min(TINY) / FP8_MAX
        return (x.double() / s).to(FP8).double() * s

    res = reference_attention(fp8_roundtrip(q), fp8_roundtrip(k), fp8_roundtrip(v), m, q_offset=q_offset,
                              scale=softmax_scale(scale, q.shape[3]), return_lse=True)
    o = res[0].to(q.dtype)
    if out is not None:
        o = out.copy_(o)
    return (o, res[1].float()) if return_lse else o
