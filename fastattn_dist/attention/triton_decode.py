"""The split-K decode kernel (flash-decoding) in Triton; decode.py holds its launcher and the combine.

One program: sequence b, kv head hk, one split of the keys. The kv head's G query heads are the rows of
one tile (padded to 16 for the tensor cores), so K and V are read once per group. The key loop stops at
the sequence's length (read on the device); a split past it stores an LSE of -inf and weighs nothing.
``QUANT``: the int8 KV cache (int8_kv.py): int8 K/V with per-token scales, the keys' smoothing mean left out of
the scores (softmax ignores it) and put back into the LSE.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _block(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, n, end, sks, svs, sss, qk_scale, offs_n, offs_d,
           BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, QUANT: tl.constexpr):
    pos = n + offs_n
    ok = pos < end
    k = tl.load(k_base + pos[None, :].to(tl.int64) * sks + offs_d[:, None], mask=ok[None, :], other=0.0)
    if QUANT:  # int8 keys (exact in q's dtype) times their per-token scales; the smoothing mean is not added back
        sk = tl.load(ks_base + pos.to(tl.int64) * sss, mask=ok, other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PREC) * (sk * qk_scale)[None, :]
    else:
        s = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + pos[:, None].to(tl.int64) * svs + offs_d[None, :], mask=ok[:, None], other=0.0)
    if QUANT:  # the per-token value scales ride on the weights: sum_j (p_j s_j) v8_j
        sv = tl.load(vs_base + pos.to(tl.int64) * sss, mask=ok, other=0.0)
        acc = tl.dot((p * sv[None, :]).to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PREC)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["HKV", "split_len"])
def split_kernel(Q, K, V, KS, VS, KM, KL, OP, LP, sqb, sqh, skb, sks, skh, svb, svs, svh, ssb, sss, sob, soh, sos,
                 slb, slh, sls, HKV, split_len, qk_scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, QUANT: tl.constexpr, INTERPRET: tl.constexpr):
    # one program: sequence b, kv head hk (its G query heads are the rows), keys of one split
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    kv_len = tl.load(KL + b).to(tl.int32)
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = hk * G + offs_g
    g_ok = offs_g < G
    q = tl.load(Q + b.to(tl.int64) * sqb + heads[:, None].to(tl.int64) * sqh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    ks_base = KS + b.to(tl.int64) * ssb + hk  # per-token scales [B, L, HKV] (QUANT only)
    vs_base = VS + b.to(tl.int64) * ssb + hk
    if INTERPRET:  # the interpreter takes no tensor bounds in range(): the same loop as a while
        n = start
        while n < end:
            acc, l_i, m_i = _block(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, n, end, sks, svs, sss,
                                   qk_scale, offs_n, offs_d, BLOCK_N, DOT_PREC, QUANT)
            n += BLOCK_N
    else:
        for n in tl.range(start, end, BLOCK_N):
            acc, l_i, m_i = _block(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, n, end, sks, svs, sss,
                                   qk_scale, offs_n, offs_d, BLOCK_N, DOT_PREC, QUANT)
    # a split past the sequence's end saw nothing: output 0, lse -inf (weight 0 in the combine)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse2 = m_i + tl.math.log2(l_safe)
    if QUANT:  # the scores were of smoothed keys: q . mean back (base 2), the same for every split of a row
        mean = tl.load(KM + (b * HKV + hk).to(tl.int64) * D + offs_d)
        lse2 += tl.sum(q.to(tl.float32) * mean[None, :], 1) * qk_scale
    lse = tl.where(l_i == 0.0, float("-inf"), lse2 * 0.6931471805599453)
    row = b.to(tl.int64) * sob + heads.to(tl.int64) * soh + split * sos
    tl.store(OP + row[:, None] + offs_d[None, :], o, mask=g_ok[:, None])
    tl.store(LP + b.to(tl.int64) * slb + heads.to(tl.int64) * slh + split * sls, lse, mask=g_ok)


@triton.jit
def combine_kernel(OP, LP, OUT, LSE, sob, soh, sos, slb, slh, sls, so_b, so_h, HQ, SPLITS,
                   D: tl.constexpr, S_PAD: tl.constexpr, HAS_LSE: tl.constexpr):
    # one program: sequence b, query head h; the splits' outputs weighed by their share of the softmax mass
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    h = (pid % HQ).to(tl.int64)
    s = tl.arange(0, S_PAD)
    ok = s < SPLITS
    lse = tl.load(LP + b * slb + h * slh + s * sls, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp(lse - m)
    d = tl.arange(0, D)
    o = tl.load(OP + b * sob + h * soh + s[:, None] * sos + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(OUT + b * so_b + h * so_h + d, out.to(OUT.dtype.element_ty))
    if HAS_LSE:
        tl.store(LSE + pid, m + tl.log(tl.sum(w, 0)))
