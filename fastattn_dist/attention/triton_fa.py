"""Triton FlashAttention-2 forward: one program per (batch, query head, block of query rows).

Same contract as ``tiled_attention``: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` with any strides
(GQA reads the shared KV head, nothing is repeated), ``q_offset`` puts query row i at absolute
position ``q_offset + i``, ``out`` may be a strided view (a slice of the o_proj input buffer).

The mask is a description, turned into constexpr flags and per-program loop bounds:

* keys ``[lo, hi)`` are the only ones any row of the program can see; blocks outside are never
  loaded (causal: nothing after the last row; window: nothing before the first row's window;
  key lengths: nothing at or after ``key_lengths[b]``);
* the key range is split into a masked stage (left window edge), an unmasked stage of blocks every
  row sees in full (no mask arithmetic at all) and a masked stage (diagonal, key-length edge).

Two ways to read tiles: plain pointer loads (any strides; masked loads never touch memory outside
``[lo, hi)``), and on Hopper host-side TMA descriptors over ``[B*S, heads*stride]`` rows when the
layout allows it. Which is faster is left to the autotuner (both are in the Hopper config list).
Softmax runs in base 2: log2(e) is folded into the scale so each score costs one FMA + exp2.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

from ..masks import Mask

LOG2E = 1.4426950408889634


@triton.jit
def key_blocks(block_fn: tl.constexpr, carry, start, end, ops, flags: tl.constexpr, BLOCK_N: tl.constexpr,
               INTERPRET: tl.constexpr):
    """One stage of a kernel's key loop (this one's and the 8-bit one's): ``carry = block_fn(carry, start_n, *ops,
    *flags)`` for the key blocks [start, end) in steps of BLOCK_N; ``ops``: the block's operands, ``flags``: its
    constexprs (tuples: the code generator flattens them)."""
    if INTERPRET:
        # the interpreter cannot take tensor bounds in range() with NumPy >= 2.4; same body, while loop
        start_n = start
        while start_n < end:
            carry = block_fn(carry, start_n, *ops, *flags)
            start_n += BLOCK_N
    else:
        for start_n in tl.range(start, end, BLOCK_N):
            carry = block_fn(carry, tl.multiple_of(start_n, BLOCK_N), *ops, *flags)
    return carry


@triton.jit
def block_visible(kv_ok, k_pos, q_pos, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[rows, keys] visibility in a masked block: keys in the range (``kv_ok``), the causal and window edges."""
    vis = kv_ok[None, :]
    if IS_CAUSAL:
        vis = vis & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        vis = vis & (k_pos[None, :] > q_pos[:, None] - window)
    return vis


@triton.jit
def _attn_block(carry, start_n, q, k_ptrs, v_ptrs, k_desc, v_desc, kv_row0, k_col, v_col,
                stride_kn, stride_vn, lo, hi, q_pos, qk_scale, window,
                MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """One key block [start_n, start_n + BLOCK_N): scores, online softmax, P @ V (``key_blocks``' block_fn)."""
    acc, l_i, m_i = carry
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    k_pos = start_n + offs_n
    # keys outside [lo, hi) are invisible to every row: masked loads never read them
    kv_ok = (k_pos >= lo) & (k_pos < hi)
    # int64 row offset once per block; the in-block offsets stay int32
    k_off = start_n.to(tl.int64) * stride_kn
    v_off = start_n.to(tl.int64) * stride_vn
    if USE_TMA:
        k = k_desc.load([kv_row0 + start_n, k_col]).T
    elif MASKED:
        k = tl.load(k_ptrs + k_off, mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
    elif D_PAD != HEAD_DIM:
        k = tl.load(k_ptrs + k_off, mask=d_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + k_off)
    qk = tl.dot(q, k, input_precision=DOT_PREC)
    if MASKED:
        # where (not an additive -1e6): garbage in a partially loaded block cannot leak as NaN
        qk = tl.where(block_visible(kv_ok, k_pos, q_pos, window, IS_CAUSAL, HAS_WINDOW), qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row that has seen nothing yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_TMA:
        v = v_desc.load([kv_row0 + start_n, v_col])
        if MASKED:  # TMA loads whole boxes: zero rows no one may see (0 * NaN would poison acc)
            v = tl.where(kv_ok[:, None], v, tl.zeros_like(v))
    elif MASKED:
        v = tl.load(v_ptrs + v_off, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
    elif D_PAD != HEAD_DIM:
        v = tl.load(v_ptrs + v_off, mask=d_ok[None, :], other=0.0)
    else:
        v = tl.load(v_ptrs + v_off)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def program_tile(Hq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's (batch, head) and query block, (pid_bh, b, h, m0, offs_m, offs_n, offs_d, d_ok): heads on
    axis 0, query blocks on axis 1 in reverse (under a causal mask the costliest blocks start first, the tail of
    the wave is made of cheap ones), so programs of one KV group run side by side and their K/V reads hit L2."""
    pid_bh = tl.program_id(0)
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    offs_d = tl.arange(0, D_PAD)
    return (pid_bh, pid_bh // Hq, pid_bh % Hq, m0, m0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), offs_d,
            offs_d < HEAD_DIM)


@triton.jit
def key_length(KL, b, Sk, HAS_KEY_LENGTHS: tl.constexpr):
    """Sequence b's number of keys: ``KL[b]`` (at most Sk) where lengths are given, else Sk."""
    n = Sk
    if HAS_KEY_LENGTHS:
        n = tl.minimum(tl.load(KL + b).to(tl.int32), Sk)
    return n


@triton.jit
def _key_range(KL, b, Sq, Sk, q_offset, m0, window, HAS_KEY_LENGTHS: tl.constexpr, IS_CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys [lo, hi) the program's rows can see, from the mask description, and its three stages: masked
    [s1, e1) (the window's left edge), unmasked whole blocks [s2, e2), masked [e2, hi) (diagonal, key length)."""
    kv_len = key_length(KL, b, Sk, HAS_KEY_LENGTHS)
    p_min = q_offset + m0
    p_max = q_offset + tl.minimum(m0 + BLOCK_M, Sq) - 1
    hi = kv_len
    full_hi = kv_len
    if IS_CAUSAL:
        hi = tl.minimum(hi, p_max + 1)
        full_hi = tl.minimum(full_hi, p_min + 1)
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(p_min - window + 1, 0)
        full_lo = tl.maximum(p_max - window + 1, 0)
    s1 = (lo // BLOCK_N) * BLOCK_N
    s2 = tl.maximum(s1, ((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    n_full = tl.maximum(full_hi - s2, 0) // BLOCK_N
    e2 = s2 + n_full * BLOCK_N
    e1 = tl.minimum(s2, hi)
    return lo, hi, s1, e1, s2, e2


@triton.jit
def _epilogue(acc, l_i, m_i, O, LSE, b, h, pid_bh, offs_m, offs_d, d_ok, Sq, stride_ob, stride_os, stride_oh,
              stride_od, RETURN_LSE: tl.constexpr):
    """Normalise and store the rows (rows with no visible key give 0 and lse = -inf)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    o_ptrs = (O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < Sq) & d_ok[None, :])
    if RETURN_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)


# Sizes and offsets vary per tile: no per-value specialisation (one compile serves every tile).
@triton.jit(do_not_specialize=["Sq", "Sk", "Hq", "G", "q_offset", "window", "TUNE_Q", "TUNE_K", "TUNE_BH"])
def _attn_fwd(Q, K, V, O, LSE, KL, q_desc, k_desc, v_desc,
              stride_qb, stride_qs, stride_qh, stride_qd,
              stride_kb, stride_ks, stride_kh, stride_kd,
              stride_vb, stride_vs, stride_vh, stride_vd,
              stride_ob, stride_os, stride_oh, stride_od,
              Sq, Sk, Hq, G, q_offset, window, qk_scale,
              TUNE_Q, TUNE_K, TUNE_BH,  # autotune key only (bucketed sizes)
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_KEY_LENGTHS: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
              INTERPRET: tl.constexpr = False):
    pid_bh, b, h, m0, offs_m, offs_n, offs_d, d_ok = program_tile(Hq, BLOCK_M, BLOCK_N, D_PAD, HEAD_DIM)
    hk = h // G
    q_pos = q_offset + offs_m
    lo, hi, s1, e1, s2, e2 = _key_range(KL, b, Sq, Sk, q_offset, m0, window, HAS_KEY_LENGTHS, IS_CAUSAL, HAS_WINDOW,
                                        BLOCK_M, BLOCK_N)

    # -- pointers / descriptors ------------------------------------------------------------------
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    k_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd  # K^T tile [D, BLOCK_N]
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd  # V tile [BLOCK_N, D]
    kv_row0 = b * Sk
    k_col = hk * stride_kh
    v_col = hk * stride_vh
    if USE_TMA:
        q = q_desc.load([b * Sq + m0, h * stride_qh])
    else:
        q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < Sq) & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # three stages: masked (the window's left edge), whole unmasked blocks, masked (diagonal, key length)
    ops = (q, k_ptrs, v_ptrs, k_desc, v_desc, kv_row0, k_col, v_col, stride_ks, stride_vs, lo, hi, q_pos, qk_scale,
           window)
    carry = (acc, l_i, m_i)
    if HAS_WINDOW:
        carry = key_blocks(_attn_block, carry, s1, e1, ops,
                           (True, IS_CAUSAL, HAS_WINDOW, USE_TMA, BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC), BLOCK_N, INTERPRET)
    carry = key_blocks(_attn_block, carry, s2, e2, ops,
                       (False, IS_CAUSAL, HAS_WINDOW, USE_TMA, BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC), BLOCK_N, INTERPRET)
    acc, l_i, m_i = key_blocks(_attn_block, carry, e2, hi, ops,
                               (True, IS_CAUSAL, HAS_WINDOW, USE_TMA, BLOCK_N, HEAD_DIM, D_PAD, DOT_PREC), BLOCK_N,
                               INTERPRET)

    _epilogue(acc, l_i, m_i, O, LSE, b, h, pid_bh, offs_m, offs_d, d_ok, Sq, stride_ob, stride_os, stride_oh,
              stride_od, RETURN_LSE)


# ------------------------------------------------------------------------------------------------
# Autotune: one config list per GPU family, pruned per call (shared memory, short tiles, TMA).
# ------------------------------------------------------------------------------------------------

def _cfg(bm, bn, w, s, tma=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=w, num_stages=s,
                         pre_hook=_set_block_shapes)


def _set_block_shapes(nargs):
    # TMA boxes follow the config's tiles; harmless for pointer configs (the descriptors go unused)
    if nargs.get("q_desc") is not None:
        nargs["q_desc"].block_shape = [nargs["BLOCK_M"], nargs["D_PAD"]]
        nargs["k_desc"].block_shape = [nargs["BLOCK_N"], nargs["D_PAD"]]
        nargs["v_desc"].block_shape = [nargs["BLOCK_N"], nargs["D_PAD"]]


def family_configs(major: int, d_pad: int = 128):
    """Autotune candidates for compute capability ``major`` (Hopper 9.x and newer, Ampere/Ada 8.x).

    Chosen from an offline sm_90 compile sweep (registers/spills per config): with head_dim 128 a
    128-row tile needs 8 warps (4 warps spill: the fp32 accumulator alone is 128 registers a thread).
    """
    if d_pad >= 256:  # big Q/acc tiles: small key blocks, shallow pipelines
        return [_cfg(64, 32, 4, 2), _cfg(64, 64, 4, 2), _cfg(128, 32, 8, 2)]
    if major >= 9:
        return [
            _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 4, 3),
            _cfg(128, 128, 8, 2, True), _cfg(128, 128, 8, 3, True), _cfg(128, 64, 8, 3, True),
            _cfg(128, 64, 8, 4, True), _cfg(64, 64, 4, 3, True), _cfg(128, 64, 4, 3, True),
        ]
    return [
        _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 4),
        _cfg(128, 64, 4, 3), _cfg(128, 128, 8, 2),
    ]


def prune_configs(configs, nargs, tma_ok: bool, smem_bytes):
    """The configs that can run a call (both kernels' early prune): TMA ones only with descriptors, tiles whose
    shared memory ``smem_bytes(BLOCK_M, BLOCK_N, stages)`` fits, no 128-row tiles on 4 warps at d >= 128 (register
    spills: the fp32 accumulator and the block product do not fit 128 threads' registers), no 128-row tiles for
    64 rows or fewer; never empty (the smallest tile)."""
    d, max_smem = nargs["D_PAD"], _max_smem(nargs["O"].device)
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if (c.kwargs["USE_TMA"] and not tma_ok) or smem_bytes(bm, bn, c.num_stages) > max_smem:
            continue
        if (d >= 128 and bm == 128 and c.num_warps == 4) or (nargs["Sq"] <= 64 and bm > 64):
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _prune(configs, nargs, **kw):
    d, esize = kw["D_PAD"], nargs["Q"].element_size()
    return prune_configs(configs, dict(nargs, **kw), nargs["q_desc"] is not None,
                         lambda bm, bn, stages: (bm * d + max(stages - 1, 1) * 2 * bn * d) * esize)


def launch_outputs(q: torch.Tensor, mask: Mask, out: Optional[torch.Tensor], return_lse: bool):
    """What both kernels' wrappers pass beside the inputs: the output (``out``, or a new tensor like ``q``), the
    LSE ``[B, Hq, Sq]`` fp32 (None unless asked), the mask's key lengths on q's device (or None) and its window
    (0: none)."""
    B, Sq, Hq, _ = q.shape
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device) if return_lse else None
    kl = mask.key_lengths
    if kl is not None and kl.device != q.device:
        kl = kl.to(q.device)
    window = mask.window if (mask.causal and mask.window is not None) else 0
    return (torch.empty_like(q) if out is None else out), lse, kl, window


def _index(device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _major_of(idx: int) -> int:
    return torch.cuda.get_device_capability(idx)[0]


def _capability_major(device) -> int:
    return _major_of(_index(device))


@functools.cache
def _smem_of(idx: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"]


def _max_smem(device) -> int:
    return _smem_of(_index(device))


_KEY = ["TUNE_Q", "TUNE_K", "TUNE_BH", "HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_KEY_LENGTHS", "RETURN_LSE",
        "DOT_PREC"]
_TUNERS = {}


def _tuner(major: int, d_pad: int, tma: bool):
    """One autotuned launcher per GPU family (and for head_dim 256) and per descriptor availability.

    ``tma``: whether this call has TMA descriptors. It must be part of the launcher's identity, not only of
    the pruning: ``triton.autotune`` caches the best config per ``_KEY`` and skips pruning on a hit, so a
    single launcher that had tuned a TMA config on a call with descriptors would hand it to a later call of
    the same key without them (a strided slice of a KV cache): a compile error on ``q_desc.load``. The
    launcher of calls without descriptors holds no TMA config at all."""
    fam = (major, d_pad >= 256, tma)
    if fam not in _TUNERS:
        configs = [c for c in family_configs(major, d_pad) if tma or not c.kwargs["USE_TMA"]]
        _TUNERS[fam] = triton.autotune(configs=configs, key=_KEY,
                                       prune_configs_by={"early_config_prune": _prune})(_attn_fwd)
    return _TUNERS[fam]


# Under TRITON_INTERPRET=1 (CPU tensors) one small config keeps tests fast; tests may change it.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
# FASTATTN_TRITON_CONFIG="BM,BN,warps,stages[,tma]" pins one config on the GPU (skips autotuning).
_ENV_CONFIG = "FASTATTN_TRITON_CONFIG"


# Whether the kernels were built for Triton's CPU interpreter (decided when @triton.jit ran: TRITON_INTERPRET=1)
INTERPRETED = type(_attn_fwd).__name__ == "InterpretedFunction"


def _pow2_bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _tma_descs(q, k, v, d_pad):
    """2-D descriptors over rows [B*S, heads*stride] when the layout allows TMA, else (None,)*3."""
    if TensorDescriptor is None or q.shape[3] != d_pad:
        return None, None, None
    descs = []
    for t in (q, k, v):
        B, S, H, D = t.shape
        sb, ss, sh, sd = t.stride()
        es = t.element_size()
        if (sd != 1 or (B > 1 and sb != S * ss) or (ss * es) % 16 or t.data_ptr() % 16 or D * es < 16
                or (H > 1 and (sh * es) % 16)):
            return None, None, None
        descs.append(TensorDescriptor(t, [B * S, (H - 1) * sh + D], [ss, 1], [16, D]))
    return tuple(descs)


def fixed_config(interp: bool, env: str = _ENV_CONFIG, interpret_config: dict = INTERPRET_CONFIG) -> Optional[dict]:
    """The one config a call uses without autotuning (None: autotune): ``interpret_config`` under the interpreter,
    else what the variable ``env`` says ("BLOCK_M,BLOCK_N,warps,stages[,tma]"; FASTATTN_TRITON_CONFIG here)."""
    if interp:
        return dict(interpret_config)
    if os.environ.get(env):
        bm, bn, w, s, *t = (int(x) for x in os.environ[env].split(","))
        return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "USE_TMA": bool(t and t[0])}
    return None


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *, q_offset: int = 0,
                     scale: Optional[float] = None, return_lse: bool = False, out: Optional[torch.Tensor] = None):
    """Same contract as ``tiled_attention`` (see the module docstring) for fp16, bf16 and fp32."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton kernel takes fp16, bf16 or fp32, got {q.dtype} (float64 goes to the torch kernel)")
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be > 0 for the triton backend, got {scale}")
    interp = INTERPRETED
    if q.device.type != "cuda" and not interp:
        raise RuntimeError("the triton backend runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 "
                           "(set before fastattn_dist.attention.triton_fa is imported)")
    d_pad = max(16, triton.next_power_of_2(D))
    out, lse, kl, window = launch_outputs(q, mask, out, return_lse)
    # fp32 inputs: exact products unless the user allowed TF32 for matmuls; 16-bit inputs: tensor cores
    dot_prec = "ieee" if q.dtype == torch.float32 and (interp or not torch.backends.cuda.matmul.allow_tf32) else "tf32"
    args = (q, k, v, out, lse if lse is not None else out, kl if kl is not None else out)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())
    meta = dict(HEAD_DIM=D, D_PAD=d_pad, IS_CAUSAL=bool(mask.causal), HAS_WINDOW=window > 0,
                HAS_KEY_LENGTHS=kl is not None, RETURN_LSE=return_lse, DOT_PREC=dot_prec)
    scalars = (Sq, Sk, Hq, Hq // Hkv, int(q_offset), int(window), scale * LOG2E,
               _pow2_bucket(Sq), _pow2_bucket(Sk), _pow2_bucket(B * Hq))

    def grid(m):
        return (B * Hq, triton.cdiv(Sq, m["BLOCK_M"]))

    fixed = fixed_config(interp)
    major = 0 if interp else _capability_major(q.device)
    descs = (None, None, None)
    if (fixed is None and major >= 9) or (fixed is not None and fixed.get("USE_TMA")):
        descs = _tma_descs(q, k, v, d_pad)
    # launches go to the current device: switch only when q lives elsewhere (the switch costs host time)
    switch = q.device.type == "cuda" and q.device.index not in (None, torch.cuda.current_device())
    with torch.cuda.device(q.device) if switch else contextlib.nullcontext():
        if fixed is not None:
            fixed = dict(fixed)
            fixed["USE_TMA"] = bool(fixed.get("USE_TMA")) and descs[0] is not None
            if not fixed["USE_TMA"]:
                descs = (None, None, None)
            _set_block_shapes({"q_desc": descs[0], "k_desc": descs[1], "v_desc": descs[2],
                               "BLOCK_M": fixed["BLOCK_M"], "BLOCK_N": fixed["BLOCK_N"], "D_PAD": d_pad})
            _attn_fwd[grid](*args, *descs, *strides, *scalars, **meta, **fixed, INTERPRET=interp)
        else:
            _tuner(major, d_pad, descs[0] is not None)[grid](*args, *descs, *strides, *scalars, **meta)
    if return_lse:
        return out, lse
    return out


# ------------------------------------------------------------------------------------------------
# Merge of two partial results over disjoint key sets (the cuDNN split path, cudnn_split.py).
# ------------------------------------------------------------------------------------------------

@triton.jit
def _merge_kernel(OUT, OA, OB, LA, LB, n_rows, S, H,
                  so_b, so_s, so_h, sa_b, sa_s, sa_h, sb_b, sb_s, sb_h,
                  sla_b, sla_h, sla_s, slb_b, slb_h, slb_s,
                  D: tl.constexpr, BLOCK_R: tl.constexpr):
    # rows are (b, s, h) triples; each row mixes two [D] vectors by their LSE: w = sigmoid(lse_a - lse_b)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < n_rows
    h = r % H
    s = (r // H) % S
    b = r // (H * S)
    b64, s64, h64 = b.to(tl.int64), s.to(tl.int64), h.to(tl.int64)
    la = tl.load(LA + b64 * sla_b + h64 * sla_h + s64 * sla_s, mask=ok, other=0.0)
    lb = tl.load(LB + b64 * slb_b + h64 * slb_h + s64 * slb_s, mask=ok, other=0.0)
    w = 1.0 / (1.0 + tl.exp(lb - la))
    d = tl.arange(0, D)[None, :]
    m2 = ok[:, None]
    oa = tl.load(OA + (b64 * sa_b + s64 * sa_s + h64 * sa_h)[:, None] + d, mask=m2, other=0.0).to(tl.float32)
    ob = tl.load(OB + (b64 * sb_b + s64 * sb_s + h64 * sb_h)[:, None] + d, mask=m2, other=0.0).to(tl.float32)
    o = ob + w[:, None] * (oa - ob)
    tl.store(OUT + (b64 * so_b + s64 * so_s + h64 * so_h)[:, None] + d, o.to(OUT.dtype.element_ty), mask=m2)


def merge_partials(out, o_a, lse_a, o_b, lse_b):
    """``out`` [B, S, H, D] = exact softmax mix of ``o_a``, ``o_b`` (same shape, any strides with a unit
    last stride) by their LSEs [B, H, S] (fp32, natural log); one pass, writes only ``out``."""
    B, S, H, D = out.shape
    for t in (out, o_a, o_b):
        if t.stride(3) != 1:
            raise ValueError("merge_partials needs a unit stride on head_dim")
    if D & (D - 1):
        raise ValueError(f"merge_partials needs a power-of-two head_dim, got {D}")
    n = B * S * H
    block = max(1, min(64, 4096 // D))
    _merge_kernel[(triton.cdiv(n, block),)](
        out, o_a, o_b, lse_a, lse_b, n, S, H, out.stride(0), out.stride(1), out.stride(2),
        o_a.stride(0), o_a.stride(1), o_a.stride(2), o_b.stride(0), o_b.stride(1), o_b.stride(2),
        lse_a.stride(0), lse_a.stride(1), lse_a.stride(2), lse_b.stride(0), lse_b.stride(1), lse_b.stride(2),
        D=D, BLOCK_R=block)
    return out
