"""The two-tier cache's attention against a float64 reference written from the attention formula, on CPU.

Decode: every split of the host tier between the CPU and the stream (shares 0, 1 and random), random device /
host boundaries, host block and stream unit sizes (so ranges start and end inside blocks and units, and the
stream's slots are reused within and across layers and steps), GQA, sliding windows across the boundary and
batches of different lengths, over several steps and layers; prefill chunks (and tiles of them) likewise. Both
head sizes run: 16 (the compiled CPU kernel) and 8 (its torch fallback).

Tolerance: float32 throughout, 1e-5 of the reference's largest magnitude (the merges add a few roundings).
"""
import math
import random

import pytest
import torch

from fastattn_dist.models.kv_offload import (TieredKVCache, decode_split, stream_units, tiered_chunk_attention,
                                             tiered_decode_attention)

TOL = 1e-5


def reference(q, K, V, keys):
    """float64 softmax(q k^T / sqrt(D)) v of one query row ``q`` [Hq, D] over key positions ``keys`` of K, V [S, Hkv, D]."""
    Hq, D = q.shape
    G = Hq // K.shape[1]
    k = K[keys].double().repeat_interleave(G, dim=1)       # [n, Hq, D]
    v = V[keys].double().repeat_interleave(G, dim=1)
    s = torch.einsum("hd,nhd->hn", q.double(), k) / math.sqrt(D)
    return torch.einsum("hn,nhd->hd", torch.softmax(s, dim=1), v)


def make_cache(rng, layers, B, S, Hkv, D, g):
    return TieredKVCache(layers, B, S, g, Hkv, D, torch.float32, torch.device("cpu"),
                         block_tokens=rng.choice([1, 2, 4, 8]), unit_blocks=rng.choice([1, 2, 3]),
                         slots=rng.choice([1, 2, 3]))


def fill(cache, rng, layer, K, V, upto):
    """Write positions [0, upto) of every sequence in random pieces, as prefill chunks and tiles would."""
    p = 0
    while p < upto:
        n = min(upto - p, rng.randint(1, 9))
        cache.write_block(layer, 0, K.shape[0], p, K[:, p:p + n], V[:, p:p + n])
        p += n


def rel(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


CASES = [(seed, D) for seed in range(8) for D in (16, 8)]


@pytest.mark.parametrize("seed,D", CASES)
def test_split_decode_equals_the_formula(seed, D):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    layers, B, Hkv, G, S, steps = 2, 3, 2, rng.choice([1, 2, 4]), 48, 4
    g = rng.randint(1, 30)
    window = rng.choice([None, None, rng.randint(2, 20)])
    share = [0.0, 1.0, 0.5, rng.random()][seed % 4]
    prompt = [rng.randint(1, S - steps - 1) for _ in range(B)]
    K = torch.randn(layers, B, S, Hkv, D, generator=gen)
    V = torch.randn(layers, B, S, Hkv, D, generator=gen)
    Q = torch.randn(steps, layers, B, 1, Hkv * G, D, generator=gen) * 2
    cache = make_cache(rng, layers, B, S, Hkv, D, g)
    for li in range(layers):
        fill(cache, rng, li, K[li], V[li], max(prompt))
    cache.set_lengths(prompt)
    lens = list(prompt)
    for step in range(steps):
        lens = [n + 1 for n in lens]
        cache.flush()
        split = decode_split(cache, lens, window, share)
        for li in range(layers):
            pos = torch.tensor([n - 1 for n in lens])
            k_new, v_new = K[li, torch.arange(B), pos][:, None], V[li, torch.arange(B), pos][:, None]
            cache.append_token(li, k_new, v_new, split)
            out = tiered_decode_attention(cache, li, Q[step, li], k_new, v_new, split)
            for b, n in enumerate(lens):
                keys = torch.arange(0 if window is None else max(0, n - window), n)
                ref = reference(Q[step, li, b, 0], K[li, b], V[li, b], keys)
                err = rel(out[b, 0], ref)
                assert err < TOL, (f"step {step} layer {li} seq {b} (len {n}, g {g}, window {window}, share "
                                   f"{share:.2f}, block {cache.block_tokens}): {err:.2e}")
        cache.host_lengths = lens
        cache.flush()
        nxt = decode_split(cache, [n + 1 for n in lens], window, share)
        cache.stream.prefetch(stream_units(cache, 0, nxt), [e for _, e in nxt.stream])


def test_the_split_follows_the_share():
    cache = TieredKVCache(1, 2, 4096, 1024, 2, 16, torch.float32, torch.device("cpu"), block_tokens=256)
    lens = [4001, 2500]
    for share in (0.0, 0.25, 0.5, 1.0):
        split = decode_split(cache, lens, None, share)
        for b, n in enumerate(lens):
            host = n - 1 - 1024
            s0, s1 = split.stream[b]
            cpu = sum(e - s for s, e in split.cpu[b])
            assert s0 == 0 and s1 + cpu == host and s1 % 256 == 0 or s1 == host
            assert abs(cpu / host - share) <= 256 / host + 1e-9, (share, cpu, host)


@pytest.mark.parametrize("seed", range(6))
def test_chunked_prefill_equals_the_formula(seed):
    rng = random.Random(100 + seed)
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, G, D, S = 2, 2, rng.choice([1, 2]), rng.choice([8, 16]), 40
    g = rng.randint(1, 30)
    window = rng.choice([None, rng.randint(2, 15)])
    lengths = torch.tensor([S, rng.randint(1, S)])
    K, V = torch.randn(B, S, Hkv, D, generator=gen), torch.randn(B, S, Hkv, D, generator=gen)
    Q = torch.randn(B, S, Hkv * G, D, generator=gen) * 2
    cache = make_cache(rng, 1, B, S, Hkv, D, g)
    p0 = 0
    while p0 < S:
        C = min(S - p0, rng.randint(1, 12))
        cache.write_block(0, 0, B, p0, K[:, p0:p0 + C], V[:, p0:p0 + C])
        out = tiered_chunk_attention(cache, 0, 0, B, Q[:, p0:p0 + C], K[:, p0:p0 + C], V[:, p0:p0 + C], p0, lengths,
                                     window)
        for b in range(B):
            for i in range(C):
                p = p0 + i
                lo = 0 if window is None else max(0, p - window + 1)
                hi = min(p + 1, int(lengths[b]))
                if hi <= lo:  # a padded row whose window holds no real key
                    continue
                keys = torch.arange(lo, hi)
                err = rel(out[b, i], reference(Q[b, p], K[b], V[b], keys))
                assert err < TOL, f"chunk at {p0}, seq {b} row {p} (g {g}, window {window}): {err:.2e}"
        p0 += C
