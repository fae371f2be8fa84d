"""Decode attention over the host tier of the KV cache, on the CPU, at host-memory speed.

One decode step attends one new query row per sequence against keys and values in (pinned) host memory.
That is a pure stream over K and V: per key, G query heads of a GQA group do 2 * G * D multiply-adds
against 2 * D * 2 bytes (bf16), so the pass is bound by how fast the cores read memory, not by arithmetic,
as long as (1) every core streams, even at batch 1 with 8 kv heads: the work is split over (sequence, kv
head, key chunk) and the chunks' partial results are combined by their log-sum-exp; (2) K and V are read
once, with bf16/fp16 -> fp32 conversion in registers, never into an fp32 copy; (3) the G query heads of a
kv head share that one pass.

Two implementations, same contract and results within fp32 rounding:

* ``compiled``: a C++ kernel (OpenMP over work items, GCC vector extensions sized to the CPU's widest
  vectors, a polynomial exp2) built at first use with ``torch.utils.cpp_extension.load_inline`` into
  torch's per-user extension cache. The default when it builds.
* ``torch``: torch ops, batched over (sequence, kv head) and chunked over keys, each chunk converted to
  fp32 and folded into a running softmax. The fallback when no compiler is present or the build fails
  (logged once), and the reference the compiled path is tested against.

``scripts/bench_host_decode.py`` measures both against the machine's memory read bandwidth.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import shutil
import threading
from typing import Optional, Tuple

import torch

from .select import host_decode_kernel_for

log = logging.getLogger("fastattn_dist")

LAYOUTS = ("bthd", "bhtd")
IMPLS = ("auto", "compiled", "torch")
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LOG2E = 1.4426950408889634

# -- the C++ kernel ------------------------------------------------------------------------------------------
# Scores are kept in the log2 domain (q is pre-scaled by scale * log2(e)) so the softmax uses exp2, which is a
# shift and a polynomial. VEC_WIDTH (floats per vector) defaults to the widest the compiler targets.
_KERNEL_SOURCE = r"""
#include <pybind11/pybind11.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifndef VEC_WIDTH
#if defined(__AVX512F__)
#define VEC_WIDTH 16
#elif defined(__AVX__)
#define VEC_WIDTH 8
#else
#define VEC_WIDTH 4
#endif
#endif
#ifndef PF_DIST
#define PF_DIST 64          // keys ahead that a head-major item prefetches its K and V rows (0: none)
#endif
#ifndef PF_LOCALITY
#define PF_LOCALITY 3       // __builtin_prefetch locality: 3 = into L1
#endif
#ifndef BLOCK_KEYS
#define BLOCK_KEYS 64       // keys per inner block: one block of K and of V (64 x 128 x 2 bytes each) stay in L1
#endif
#if defined(__AVX512F__)
#define VEC_REGISTERS 32
#else
#define VEC_REGISTERS 16
#endif

namespace {

constexpr int W = VEC_WIDTH;
static_assert(W == 4 || W == 8 || W == 16, "vector width must be 4, 8 or 16 floats");
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu32 __attribute__((vector_size(W * 4)));
typedef float v4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));

#if defined(__clang__)
#define SHUFFLE4(a, b, i, j, k, l) __builtin_shufflevector(a, b, i, j, k, l)
#else
#define SHUFFLE4(a, b, i, j, k, l) __builtin_shuffle(a, b, vi4{i, j, k, l})
#endif

constexpr int BLOCK = BLOCK_KEYS;
constexpr int KEY_TILE = 4; // keys per score tile: their 4 dot products are reduced together into one store
// query heads per tile: accumulators + loads must fit the vector registers (16 with AVX2, 32 with AVX-512)
constexpr int SCORE_HEADS = VEC_REGISTERS >= 32 ? 4 : 2;
constexpr int VALUE_HEADS = 4;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }

inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else {  // subnormal: normalise
        int e = -1;
        do { man <<= 1; ++e; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f; std::memcpy(&f, &bits, 4); return f;
}

inline vf load(const fp16_t* p) {
#if VEC_WIDTH == 16 && defined(__AVX512F__)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif VEC_WIDTH == 8 && defined(__F16C__)
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#else
    vf r;
    for (int i = 0; i < W; ++i) r[i] = half_to_float(p[i].bits);
    return r;
#endif
}

inline v4 fold4(vf x) {  // lanes folded onto 4: x[0:4] + x[4:8] + ...
    v4 r; std::memcpy(&r, &x, 16);
    for (int i = 4; i < W; i += 4) { v4 h; std::memcpy(&h, (const float*)&x + i, 16); r += h; }
    return r;
}

inline v4 sum4(vf a, vf b, vf c, vf d) {  // {sum a, sum b, sum c, sum d} by a transposing tree
    v4 a4 = fold4(a), b4 = fold4(b), c4 = fold4(c), d4 = fold4(d);
    v4 ab = SHUFFLE4(a4, b4, 0, 4, 2, 6) + SHUFFLE4(a4, b4, 1, 5, 3, 7);   // a01 b01 a23 b23
    v4 cd = SHUFFLE4(c4, d4, 0, 4, 2, 6) + SHUFFLE4(c4, d4, 1, 5, 3, 7);
    return SHUFFLE4(ab, cd, 0, 1, 4, 5) + SHUFFLE4(ab, cd, 2, 3, 6, 7);
}

inline float hsum(vf x) { v4 s = fold4(x); return (s[0] + s[2]) + (s[1] + s[3]); }
inline float hmax(vf x) { float r = x[0]; for (int i = 1; i < W; ++i) r = std::max(r, x[i]); return r; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// 2^x for x <= 0 (the softmax's shifted scores): x = n + f, |f| <= 1/2, 2^f by its Taylor series to degree 7
// (truncation 5e-9, below fp32 rounding), 2^n put into the exponent bits. Below -126 (and -inf) gives 0.
inline vf exp2_nonpositive(vf x) {
    const vf lo = splat(-126.f);
    vf xc = x < lo ? lo : x;
    vi n = __builtin_convertvector(xc - 0.5f, vi);   // truncation toward 0 == round to nearest for x <= 0
    vf f = xc - __builtin_convertvector(n, vf);
    vf p = splat(1.525273380405984e-05f);
    p = p * f + 1.5403530393381608e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.618129107628477e-03f;
    p = p * f + 5.550410866482158e-02f;
    p = p * f + 2.402265069591007e-01f;
    p = p * f + 6.931471805599453e-01f;
    p = p * f + 1.0f;
    vf two_n = (vf)((n + 127) << 23);
    return x < lo ? splat(0.f) : p * two_n;
}

// Rows are read 2W elements at a time as two float vectors, in "pair order": for bf16 the even and the odd
// elements (one load of W 32-bit words, then a shift and a mask: no shuffles), for fp16 and fp32 the first
// and the second half. Queries and accumulators are kept in the same order; the combine step undoes it.
inline void load2(const bf16_t* p, vf& a, vf& b) {
    vu32 w; std::memcpy(&w, p, sizeof w);
    a = (vf)(w << 16);
    b = (vf)(w & 0xffff0000u);
}
inline void load2(const fp16_t* p, vf& a, vf& b) { a = load(p); b = load(p + W); }
inline void load2(const float* p, vf& a, vf& b) { a = load(p); b = load(p + W); }
template <typename E> constexpr bool interleaved = false;
template <> constexpr bool interleaved<bf16_t> = true;

// position of element d of a row in pair order
template <typename E> inline int pair_index(int d) {
    if (!interleaved<E>) return d;
    int c = d / (2 * W) * (2 * W), r = d - c;
    return c + (r & 1) * W + r / 2;
}

// s[g][t0 : t0 + 4] = q[g] . k[t0 + j] for GB query heads and 4 keys: the GB heads share each key load and
// conversion, and the 4 x GB sums are reduced 4 at a time into one store per head.
template <int GB, typename E>
inline void score_tile(const float* q, int D, const E* k, int64_t k_st, float* s, int64_t pf) {
    vf acc[GB][KEY_TILE];
    for (int g = 0; g < GB; ++g)
        for (int j = 0; j < KEY_TILE; ++j) acc[g][j] = splat(0.f);
    if (pf)  // rows read later, pf elements on: their misses overlap this arithmetic
        for (int j = 0; j < KEY_TILE; ++j)
            for (int b = 0; b < D * (int)sizeof(E); b += 64) __builtin_prefetch((const char*)(k + j * k_st + pf) + b, 0, PF_LOCALITY);
    for (int d = 0; d < D; d += 2 * W) {
        vf qa[GB], qb[GB];
        for (int g = 0; g < GB; ++g) { qa[g] = load(q + g * D + d); qb[g] = load(q + g * D + d + W); }
        for (int j = 0; j < KEY_TILE; ++j) {
            vf ka, kb;
            load2(k + j * k_st + d, ka, kb);
            for (int g = 0; g < GB; ++g) acc[g][j] += qa[g] * ka + qb[g] * kb;
        }
    }
    for (int g = 0; g < GB; ++g) {
        v4 r = sum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
        std::memcpy(s + g * BLOCK, &r, 16);
    }
}

template <int GB, typename E>
inline void score_rows(const float* q, int D, const E* k, int64_t k_st, int n, float* s, int64_t pf) {
    int t = 0;
    for (; t + KEY_TILE <= n; t += KEY_TILE) score_tile<GB>(q, D, k + t * k_st, k_st, s + t, pf);
    for (; t < n; ++t) {  // the block's last keys, one at a time
        for (int g = 0; g < GB; ++g) {
            vf a = splat(0.f);
            for (int d = 0; d < D; d += 2 * W) {
                vf ka, kb;
                load2(k + t * k_st + d, ka, kb);
                a += load(q + g * D + d) * ka + load(q + g * D + d + W) * kb;
            }
            s[g * BLOCK + t] = hsum(a);
        }
    }
}

// acc[g][d0 : d0 + 2*R*W] += sum_t p[g][t] * v[t][d0 : d0 + 2*R*W]: GB x 2R accumulators in registers.
template <int GB, int R, typename E>
inline void value_tile(const float* p, const E* v, int64_t v_st, int n, int D, int d0, float* acc, int64_t pf) {
    vf o[GB][2 * R];
    for (int g = 0; g < GB; ++g)
        for (int r = 0; r < 2 * R; ++r) o[g][r] = load(acc + g * D + d0 + r * W);
    for (int t = 0; t < n; ++t) {
        const E* vt = v + t * v_st + d0;
        if (pf && d0 == 0)
            for (int b = 0; b < D * (int)sizeof(E); b += 64) __builtin_prefetch((const char*)(vt + pf) + b, 0, PF_LOCALITY);
        vf x[2 * R];
        for (int r = 0; r < R; ++r) load2(vt + 2 * r * W, x[2 * r], x[2 * r + 1]);
        for (int g = 0; g < GB; ++g) {
            vf pg = splat(p[g * BLOCK + t]);
            for (int r = 0; r < 2 * R; ++r) o[g][r] += pg * x[r];
        }
    }
    for (int g = 0; g < GB; ++g)
        for (int r = 0; r < 2 * R; ++r) store(acc + g * D + d0 + r * W, o[g][r]);
}

template <int GB, typename E>
inline void value_rows(const float* p, const E* v, int64_t v_st, int n, int D, float* acc, int64_t pf) {
    // the widest tile whose 2R x GB accumulators, 2R loaded vectors and a broadcast fit the registers
    constexpr int R0 = (VEC_REGISTERS - 1) / (2 * (GB + 1));
    constexpr int R = R0 >= 4 ? 4 : R0 >= 2 ? 2 : 1;
    int d0 = 0;
    for (; d0 + 2 * R * W <= D; d0 += 2 * R * W) value_tile<GB, R>(p, v, v_st, n, D, d0, acc, pf);
    for (; d0 < D; d0 += 2 * W) value_tile<GB, 1>(p, v, v_st, n, D, d0, acc, pf);
}

// rows(g0, R) for the heads [g0, g0 + R) of G in groups of at most MAX (<= 4), R as a compile-time constant:
// groups of heads re-read the block from L1
template <int MAX, typename F>
void head_groups(int G, F&& rows) {
    static_assert(MAX >= 1 && MAX <= 4, "groups of 1 to 4 heads");
    for (int g0 = 0; g0 < G;) {
        int gb = std::min(MAX, G - g0);
        if (gb >= 4) rows(g0, std::integral_constant<int, 4>{});
        else if (gb == 3) rows(g0, std::integral_constant<int, 3>{});
        else if (gb == 2) rows(g0, std::integral_constant<int, 2>{});
        else rows(g0, std::integral_constant<int, 1>{});
        g0 += gb;
    }
}

template <typename E>
void block_scores(const float* q, int G, int D, const E* k, int64_t k_st, int n, float* s, int64_t pf) {
    head_groups<SCORE_HEADS>(G, [&](int g0, auto R) {
        score_rows<decltype(R)::value>(q + g0 * D, D, k, k_st, n, s + g0 * BLOCK, g0 ? 0 : pf);
    });
}

template <typename E>
void block_values(const float* p, int G, int D, const E* v, int64_t v_st, int n, float* acc, int64_t pf) {
    head_groups<VALUE_HEADS>(G, [&](int g0, auto R) {
        value_rows<decltype(R)::value>(p + g0 * BLOCK, v, v_st, n, D, acc + g0 * D, g0 ? 0 : pf);
    });
}

// One block of nb keys of one kv head folded into its G query heads' online softmax: the running max m (log2
// domain), the sum l and the unnormalised accumulator acc [G][D] (pair order).
template <typename E>
void attend_block(const float* q, int G, int D, const E* k, int64_t k_st, const E* v, int64_t v_st, int nb,
                  float* m, float* l, float* acc, float* s, int64_t k_pf, int64_t v_pf) {
    block_scores(q, G, D, k, k_st, nb, s, k_pf);
    int padded = (nb + W - 1) / W * W;
    for (int g = 0; g < G; ++g) {
        float* sg = s + g * BLOCK;
        for (int t = nb; t < padded; ++t) sg[t] = NEG_INF;   // tail lanes give exp2 = 0
        vf mv = splat(NEG_INF);
        for (int t = 0; t < padded; t += W) mv = vmax(mv, load(sg + t));
        float m_new = std::max(m[g], hmax(mv));
        if (m_new != m[g]) {
            float alpha = m[g] == NEG_INF ? 0.f : std::exp2(m[g] - m_new);
            l[g] *= alpha;
            float* ag = acc + (size_t)g * D;
            for (int d = 0; d < D; ++d) ag[d] *= alpha;
            m[g] = m_new;
        }
        vf sum = splat(0.f), mn = splat(m_new);
        for (int t = 0; t < padded; t += W) {
            vf p = exp2_nonpositive(load(sg + t) - mn);
            store(sg + t, p);
            sum += p;
        }
        l[g] += hsum(sum);
    }
    block_values(s, G, D, v, v_st, nb, acc, v_pf);
}

// A work item: keys [t0, t1) of sequence b for kv heads [h0, h1). Head-major caches take one head per item (its
// keys are one contiguous run); key-major caches take all heads, so that an item streams one contiguous region,
// block by block, instead of every thread striding through pages that hold every head.
struct Item { int64_t b, h0, h1, t0, t1, chunk_index; };

// The query rows as the caller holds them (any of the three dtypes, strided), read once into fp32, scaled.
struct Query {
    const void* p; int dtype; int64_t sb, sh; float scale;
    float at(int64_t b, int64_t h, int d) const {
        const int64_t i = b * sb + h * sh + d;
        float x;
        if (dtype == 0) x = ((const float*)p)[i];
        else if (dtype == 1) { uint32_t bits = (uint32_t)((const uint16_t*)p)[i] << 16; std::memcpy(&x, &bits, 4); }
        else x = half_to_float(((const uint16_t*)p)[i]);
        return x * scale;
    }
};

template <typename E>
void run(const Query& q, const E* k, const int64_t* ks, const E* v, const int64_t* vs, const int64_t* lengths,
         int64_t B, int64_t H, int G, int D, float* out, float* lse, int64_t heads_per_item, int threads) {
    // Keys per item: about 8 items per thread (dynamic scheduling evens out busy cores and ragged lengths), at
    // least 256 key rows per item so its fixed cost stays small, whole blocks.
    int64_t key_rows = 0;
    for (int64_t b = 0; b < B; ++b) key_rows += lengths[b] * H;
    int64_t chunk = std::max((256 + heads_per_item - 1) / heads_per_item,
                             (key_rows + 8 * threads * heads_per_item - 1) / (8 * threads * heads_per_item));
    chunk = (chunk + BLOCK - 1) / BLOCK * BLOCK;
    // partial results per (b, h, chunk), at slot base[b] + h * chunks[b] + chunk
    std::vector<int64_t> chunks(B), base(B + 1, 0);
    for (int64_t b = 0; b < B; ++b) {
        chunks[b] = (lengths[b] + chunk - 1) / chunk;
        base[b + 1] = base[b] + H * chunks[b];
    }
    std::vector<Item> items;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h0 = 0; h0 < H; h0 += heads_per_item)
            for (int64_t c = 0; c < chunks[b]; ++c)
                items.push_back({b, h0, std::min(H, h0 + heads_per_item), c * chunk,
                                 std::min(lengths[b], (c + 1) * chunk), c});
    const int64_t n_items = (int64_t)items.size(), row = (int64_t)G * (D + 2), rows = B * H * G;
    // left uninitialised: every slot is written by its item, every query row below
    std::unique_ptr<float[]> partial_buf(new float[std::max<int64_t>(base[B], 1) * row]);
    std::unique_ptr<float[]> qp(new float[rows * D]);   // the queries, scaled, in pair order
    float* partial = partial_buf.get();
    std::vector<int> order(D);
    for (int d = 0; d < D; ++d) order[d] = pair_index<E>(d);
    const float LN2 = 0.6931471805599453f;
    threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, std::max(n_items, B * H)));

    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t b = r / (H * G), hq = r % (H * G);
            for (int d = 0; d < D; ++d) qp[r * D + order[d]] = q.at(b, hq, d);
        }
        std::vector<float> s((size_t)G * BLOCK + W);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_items; ++i) {
            const Item& it = items[i];
            for (int64_t h = it.h0; h < it.h1; ++h) {
                float* pm = partial + (base[it.b] + h * chunks[it.b] + it.chunk_index) * row;
                for (int g = 0; g < G; ++g) { pm[g] = NEG_INF; pm[G + g] = 0.f; }
                std::fill(pm + 2 * G, pm + row, 0.f);
            }
            for (int64_t t0 = it.t0; t0 < it.t1; t0 += BLOCK) {
                const int nb = (int)std::min<int64_t>(BLOCK, it.t1 - t0);
                for (int64_t h = it.h0; h < it.h1; ++h) {
                    float* pm = partial + (base[it.b] + h * chunks[it.b] + it.chunk_index) * row;
                    // prefetch what this item reads next: the same head PF_DIST keys on when an item is one head,
                    // else the next head's rows of this block (the next block's first head after the last)
                    int64_t k_pf = PF_DIST * ks[1], v_pf = PF_DIST * vs[1];
                    if (it.h1 - it.h0 > 1) {
                        k_pf = h + 1 < it.h1 ? ks[2] : BLOCK * ks[1] - (h - it.h0) * ks[2];
                        v_pf = h + 1 < it.h1 ? vs[2] : BLOCK * vs[1] - (h - it.h0) * vs[2];
                    }
                    attend_block(qp.get() + (it.b * H + h) * G * D, G, D, k + it.b * ks[0] + h * ks[2] + t0 * ks[1],
                                 ks[1], v + it.b * vs[0] + h * vs[2] + t0 * vs[1], vs[1], nb, pm, pm + G, pm + 2 * G,
                                 s.data(), k_pf, v_pf);
                }
            }
        }
        // combine the chunks of each (b, h) by their log-sum-exp, back in natural order
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H, first = base[b] + h * chunks[b], last = first + chunks[b];
            for (int g = 0; g < G; ++g) {
                float* o = out + (bh * G + g) * D;
                float M = NEG_INF;
                for (int64_t i = first; i < last; ++i) M = std::max(M, partial[i * row + g]);
                std::fill(o, o + D, 0.f);
                if (M == NEG_INF) { lse[bh * G + g] = NEG_INF; continue; }
                float L = 0.f;
                for (int64_t i = first; i < last; ++i) {
                    const float* pm = partial + i * row;
                    float w = std::exp2(pm[g] - M);
                    L += w * pm[G + g];
                    const float* a = pm + 2 * G + (size_t)g * D;
                    for (int d = 0; d < D; ++d) o[d] += w * a[order[d]];
                }
                float inv = 1.f / L;
                for (int d = 0; d < D; ++d) o[d] *= inv;
                lse[bh * G + g] = (M + std::log2(L)) * LN2;
            }
        }
    }
}

}  // namespace

// Pointers come from the Python wrapper, which has checked shapes, dtypes and strides and keeps the tensors
// alive for the call. q [B, 1, H*G, D] with strides q_sb, q_sh (elements; unit stride over D), scaled here by
// scale_log2 = scale * log2(e); k/v strides (elements) of (sequence, key, kv head), unit stride over D; dtype
// codes 0 fp32, 1 bf16, 2 fp16; lengths int64 [B]; out fp32 [B, H*G, D] and lse fp32 [B, H*G], contiguous.
void host_decode(uintptr_t q, int q_dtype, int64_t q_sb, int64_t q_sh, double scale_log2, uintptr_t k, int64_t k_sb,
                 int64_t k_st, int64_t k_sh, uintptr_t v, int64_t v_sb, int64_t v_st, int64_t v_sh, int dtype,
                 uintptr_t lengths, int64_t B, int64_t H, int64_t G, int64_t D, uintptr_t out, uintptr_t lse,
                 int64_t heads_per_item, int threads) {
    if (D % (2 * W) != 0) throw std::invalid_argument("head_dim must be a multiple of twice the vector width");
    if (q_dtype < 0 || q_dtype > 2) throw std::invalid_argument("unknown dtype code");
    const Query qr{(const void*)q, q_dtype, q_sb, q_sh, (float)scale_log2};
    const int64_t ks[3] = {k_sb, k_st, k_sh}, vs[3] = {v_sb, v_st, v_sh};
    auto lp = (const int64_t*)lengths;
    auto op = (float*)out;
    auto lsep = (float*)lse;
    auto go = [&](auto elem) {
        using E = decltype(elem);
        run(qr, (const E*)k, ks, (const E*)v, vs, lp, B, H, (int)G, (int)D, op, lsep, heads_per_item, threads);
    };
    if (dtype == 0) go(float{});
    else if (dtype == 1) go(bf16_t{});
    else if (dtype == 2) go(fp16_t{});
    else throw std::invalid_argument("unknown dtype code");
}

// head_dim must be a multiple of this
int head_dim_multiple() { return 2 * W; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    // the GIL is released: the model's thread keeps driving the GPU while this one reads the host tier
    m.def("host_decode", &host_decode, pybind11::call_guard<pybind11::gil_scoped_release>());
    m.def("head_dim_multiple", &head_dim_multiple);
}
"""


# -- building the kernel -------------------------------------------------------------------------------------
_build_lock = threading.Lock()
_modules: dict = {}       # vector width (None: the CPU's) -> built module, or the reason it is unavailable
_fallback_told = False


def _cpu_identity() -> str:
    """What a -march=native binary depends on: a cache shared by hosts with different CPUs must not mix them."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _native_flags() -> list:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def _missing_toolchain() -> Optional[str]:
    from torch.utils import cpp_extension  # pulls in setuptools and the build machinery: only to build
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension builds with it)"
    return None


def _build(vec_width: Optional[int] = None):
    """Compile (or load from torch's per-user extension cache) the kernel; ``vec_width`` forces the vector
    width (tests use it to run the AVX-512 code shape on narrower CPUs). Raises on any failure."""
    from torch.utils import cpp_extension  # pulls in setuptools and the build machinery: only to build
    cflags = ["-O3", "-fopenmp", *_native_flags()]
    if vec_width is not None:
        cflags.append(f"-DVEC_WIDTH={int(vec_width)}")
    key = "\n".join([_KERNEL_SOURCE, " ".join(cflags), _cpu_identity(), torch.__version__])
    name = "fastattn_host_decode_" + hashlib.sha256(key.encode()).hexdigest()[:16]
    kwargs = {}
    if "no_implicit_headers" in cpp_extension.load_inline.__code__.co_varnames:
        kwargs["no_implicit_headers"] = True  # only pybind11: torch's own headers would triple the build time
    return cpp_extension.load_inline(name=name, cpp_sources=[_KERNEL_SOURCE], extra_cflags=cflags,
                                     extra_ldflags=["-fopenmp"], verbose=False, **kwargs)


def compiled_kernel(vec_width: Optional[int] = None):
    """The compiled kernel module, built at the first call of the process; None when it cannot be (no compiler
    or ninja, a failed build: the reason is logged once and ``compiled_unavailable`` returns it)."""
    global _fallback_told
    with _build_lock:
        if vec_width not in _modules:
            why = _missing_toolchain()
            if why is None:
                try:
                    _modules[vec_width] = _build(vec_width)
                except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
                    lines = str(e).strip().splitlines()
                    said = [ln for ln in lines if "error" in ln.lower()] or lines or [""]
                    why = f"the build failed: {type(e).__name__}: {said[-1].strip()[:300]}"
            if why is not None:
                _modules[vec_width] = why
                if not _fallback_told:
                    _fallback_told = True
                    log.warning("host decode attention: the C++ kernel is unavailable (%s); using the torch path",
                                why)
        mod = _modules[vec_width]
    return None if isinstance(mod, str) else mod


def compiled_unavailable(vec_width: Optional[int] = None) -> Optional[str]:
    """None when the compiled kernel is usable, else why not (builds it if not tried yet)."""
    compiled_kernel(vec_width)
    mod = _modules[vec_width]
    return mod if isinstance(mod, str) else None


# -- input checks --------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, key_lengths, layout, scale, threads, impl) -> torch.Tensor:
    """Raise TypeError/ValueError for anything this function cannot take; return the key lengths as int64."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {list(t.shape)}")
        if not t.is_cpu:
            raise ValueError(f"{name} must be a CPU tensor (the host tier), got one on {t.device}")
        if t.dtype not in _DTYPE_CODE:
            raise TypeError(f"{name} must be bf16, fp16 or fp32, got {t.dtype}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    B, S, Hq, D = q.shape
    Hkv, T = (k.shape[2], k.shape[1]) if layout == "bthd" else (k.shape[1], k.shape[2])
    if S != 1:
        raise ValueError(f"q must hold one query row per sequence, [B, 1, Hq, D]; got shape {list(q.shape)}")
    if B < 1 or Hq < 1 or D < 1 or Hkv < 1:
        raise ValueError(f"empty input: q {list(q.shape)}, k {list(k.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"batch of q ({B}) and k ({k.shape[0]}) differ")
    if k.shape[3] != D:
        raise ValueError(f"head_dim of q ({D}) and k ({k.shape[3]}) differ")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv}; layout {layout!r})")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not (math.isfinite(scale) and scale > 0)):
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    if key_lengths is None:
        return torch.full((B,), T, dtype=torch.int64)
    if not isinstance(key_lengths, torch.Tensor):
        if not isinstance(key_lengths, (list, tuple)) or \
                not all(isinstance(n, int) and not isinstance(n, bool) for n in key_lengths):
            raise TypeError("key_lengths must be an integer tensor or a list of ints")
        key_lengths = torch.tensor(key_lengths, dtype=torch.int64)
    if key_lengths.dtype.is_floating_point or key_lengths.dtype.is_complex or key_lengths.dtype == torch.bool:
        raise TypeError(f"key_lengths must be an integer tensor, got {key_lengths.dtype}")
    if not key_lengths.is_cpu:
        raise ValueError(f"key_lengths must be a CPU tensor, got one on {key_lengths.device}")
    if key_lengths.shape != (B,):
        raise ValueError(f"key_lengths must have shape [{B}], got {list(key_lengths.shape)}")
    lengths = key_lengths
    if lengths.dtype != torch.int64 or not lengths.is_contiguous():
        lengths = lengths.to(torch.int64).contiguous()
    values = lengths.tolist()   # a few ints: cheaper than reductions
    lo, hi = (min(values), max(values)) if values else (0, 0)
    if lo < 0 or hi > T:
        raise ValueError(f"key_lengths must lie in [0, {T}] (the keys given), got min {lo}, max {hi}")
    return lengths


# -- the two implementations ---------------------------------------------------------------------------------
_threads_lock = threading.Lock()


def _torch_decode(q, k, v, lengths, layout, scale, chunk: Optional[int] = None):
    """Torch ops: per chunk of keys, one batched matmul over (sequence, kv head) for the scores of a GQA group
    and one for the values, the chunk converted into a reused fp32 buffer, folded in by online softmax."""
    B, _, Hq, D = q.shape
    kh = k.permute(0, 2, 1, 3) if layout == "bthd" else k   # [B, Hkv, T, D] views
    vh = v.permute(0, 2, 1, 3) if layout == "bthd" else v
    Hkv = kh.shape[1]
    G = Hq // Hkv
    if chunk is None:
        # fp32 buffers of K and V of ~4 MiB each: the best measured (2 cores), from 8 x 128 heads to 128 x 128
        chunk = max(64, (1 << 20) // (B * Hkv * D) // 64 * 64)
    qg = q.reshape(B, Hkv, G, D).to(torch.float32) * scale
    n = int(lengths.max())
    m = torch.full((B, Hkv, G, 1), float("-inf"))
    l = torch.zeros(B, Hkv, G, 1)
    acc = torch.zeros(B, Hkv, G, D)
    c = max(1, min(chunk, n))
    kbuf = torch.empty(B, Hkv, c, D)
    vbuf = torch.empty(B, Hkv, c, D)
    pos = torch.arange(n)
    ragged = int(lengths.min()) < n
    for s in range(0, n, c):
        e = min(n, s + c)
        kc, vc = kbuf[:, :, :e - s], vbuf[:, :, :e - s]
        kc.copy_(kh[:, :, s:e])
        vc.copy_(vh[:, :, s:e])
        sc = torch.matmul(qg, kc.transpose(-1, -2))          # [B, Hkv, G, c]
        if ragged:
            sc.masked_fill_((pos[s:e][None, :] >= lengths[:, None])[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, sc.amax(dim=-1, keepdim=True))
        # a row with no key yet keeps m = -inf: shift by 0 so exp gives 0, not NaN
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(sc - m_safe)
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + torch.matmul(p, vc)
        m = m_new
    out = acc / torch.where(l == 0, torch.ones_like(l), l)
    lse = torch.where(l == 0, torch.full_like(l, float("-inf")), m + torch.log(l))
    return out.reshape(B, 1, Hq, D), lse.reshape(B, Hq, 1)


def _compiled_decode(mod, q, k, v, lengths, layout, scale, threads, heads_per_item=None):
    B, _, Hq, D = q.shape
    Hkv = k.shape[2] if layout == "bthd" else k.shape[1]
    # key-major: an item takes every head of its keys, so it reads one contiguous region
    heads_per_item = heads_per_item or (Hkv if layout == "bthd" else 1)
    if q.stride(3) != 1:
        q = q.contiguous()
    out = torch.empty(B, 1, Hq, D)
    lse = torch.empty(B, Hq, 1)
    ks, vs = k.stride(), v.stride()
    if layout == "bthd":   # (sequence, key, kv head) in elements
        k_strides, v_strides = (ks[0], ks[1], ks[2]), (vs[0], vs[1], vs[2])
    else:
        k_strides, v_strides = (ks[0], ks[2], ks[1]), (vs[0], vs[2], vs[1])
    mod.host_decode(q.data_ptr(), _DTYPE_CODE[q.dtype], q.stride(0), q.stride(2), scale * _LOG2E,
                    k.data_ptr(), *k_strides, v.data_ptr(), *v_strides, _DTYPE_CODE[k.dtype],
                    lengths.data_ptr(), B, Hkv, Hq // Hkv, D, out.data_ptr(), lse.data_ptr(), heads_per_item, threads)
    return out, lse


def host_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_lengths: Optional[torch.Tensor] = None, *, layout: str = "bthd",
                          scale: Optional[float] = None, threads: Optional[int] = None,
                          impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """One query row per sequence against the host tier: ``(out float32 [B, 1, Hq, D], lse float32 [B, Hq, 1])``.

    ``q``: ``[B, 1, Hq, D]`` (bf16, fp16 or fp32). ``k``, ``v``: one dtype of those three, in the layout
    ``layout`` names: ``"bthd"`` = ``[B, T, Hkv, D]`` (what ``TieredKVCache.host_k[layer]`` holds; a slice
    ``[:, :n]`` is fine) or ``"bhtd"`` = ``[B, Hkv, T, D]`` (head-major: each head's keys are contiguous).
    Any strides, as long as ``D`` is the innermost dimension for the compiled kernel (else the torch path
    runs). Query head ``h`` reads kv head ``h // (Hq // Hkv)``.

    ``key_lengths``: int tensor or list ``[B]``, keys ``[0, key_lengths[b])`` of sequence b are attended
    (0 gives out 0 and lse -inf); None: all T. ``scale``: default ``1/sqrt(D)``. ``lse`` is the natural log of
    the sum of ``exp(scale * q.k)``, as ``tiled_attention(..., return_lse=True)`` gives it. ``threads``: CPU
    threads (default ``torch.get_num_threads()``); the torch path sets torch's intra-op count, process-wide,
    for the duration of the call. ``impl``: ``"auto"`` (the compiled kernel when it builds and takes the
    input, else torch), ``"compiled"`` (raise RuntimeError when it cannot run) or ``"torch"``.
    """
    lengths = _check_inputs(q, k, v, key_lengths, layout, scale, threads, impl)
    D = q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    threads = threads or torch.get_num_threads()
    mod = compiled_kernel() if impl != "torch" else None
    which, why = host_decode_kernel_for(impl, mod, _modules.get(None), q, k, v)
    if which == "compiled":
        return _compiled_decode(mod, q, k, v, lengths, layout, scale, threads)
    if impl == "compiled":
        raise RuntimeError(f"the compiled host decode kernel cannot run this call: {why}")
    if threads == torch.get_num_threads():
        return _torch_decode(q, k, v, lengths, layout, scale)
    with _threads_lock:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return _torch_decode(q, k, v, lengths, layout, scale)
        finally:
            torch.set_num_threads(before)


__all__ = ["host_decode_attention", "compiled_kernel", "compiled_unavailable", "LAYOUTS", "IMPLS"]
