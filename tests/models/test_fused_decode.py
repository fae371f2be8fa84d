"""The GPU decode path (fused Triton kernels) run on CPU tensors under TRITON_INTERPRET=1, against the plain
PyTorch decode path that matches transformers (test_llama.py): the same logits and the same cache; over the
int8 cache too (the append quantizes, bit for bit as the torch path does)."""
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported: run the kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("interpreter tests: set TRITON_INTERPRET=1 (the GPU checks are in tests/gpu)", allow_module_level=True)
for mod in ("fastattn_dist.attention.triton_fa", "fastattn_dist.attention.triton_int8",
            "fastattn_dist.attention.triton_decode", "fastattn_dist.models.triton_fused"):
    if mod in sys.modules:  # imported earlier without the interpreter: rebuild
        importlib.reload(sys.modules[mod])

from fastattn_dist.attention.int8_kv import Int8KV, quantize_tokens  # noqa: E402
from fastattn_dist.models import triton_fused as tf  # noqa: E402
from fastattn_dist.models.llama import LlamaForCausalLM
from fastattn_dist.models.layers import rms_norm  # noqa: E402
from fastattn_dist.models.tiny import tiny_checkpoint  # noqa: E402
from fastattn_dist.rope import Rotary  # noqa: E402


def decode_runs(make_model, strategies, ids, lengths, max_seq_len, steps, share=None):
    """For each decode strategy, from a fresh model's prefill of ``ids``: ``steps`` greedy steps' logits
    (stacked) and the cache they leave (``share``: the host tier's CPU share, for a two-tier cache)."""
    runs = []
    for strategy in strategies:
        m = make_model()
        m.reset_cache(ids.shape[0], max_seq_len)
        if share is not None:
            m.kv_plan.decode_cpu_share = share
        tok = m.prefill(ids, lengths).argmax(-1)
        step, logits = strategy(m), []
        for _ in range(steps):
            logits.append(step(tok))
            tok = logits[-1].argmax(-1)
        runs.append((torch.stack(logits), m.cache))
    return runs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_add_rms_norm_matches_the_torch_lines(dtype, tol):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 96, generator=g).to(dtype)
    d = torch.randn(5, 96, generator=g).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    want_h = h + (d + bias)
    want = rms_norm(want_h, w, 1e-5)
    got_h = h.clone()
    got = tf.add_rms_norm(got_h, w, 1e-5, delta=d, bias=bias)
    assert torch.allclose(got_h.float(), want_h.float(), atol=tol) and torch.allclose(got.float(), want.float(), atol=tol)
    plain = tf.add_rms_norm(h.clone(), w, 1e-5)  # no residual: only the norm
    assert torch.allclose(plain.float(), rms_norm(h, w, 1e-5).float(), atol=tol)


def test_rope_append_rotates_and_writes_the_cache_at_each_position():
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, D, L = 3, 4, 2, 16, 12
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=g)
    pos = torch.tensor([0, 5, 11])
    rot = Rotary(D, 10000.0)
    cos, sin = rot.tables(L, torch.device("cpu"), torch.float32)
    kc, vc = torch.zeros(B, L, Hkv, D), torch.zeros(B, L, Hkv, D)
    q = tf.rope_append(qkv, cos, sin, pos, kc, vc, Hq, Hkv)
    q_ref, k_ref, v_ref = qkv.split([Hq * D, Hkv * D, Hkv * D], -1)
    assert torch.allclose(q, rot.apply(q_ref.view(B, 1, Hq, D), pos[:, None]), atol=1e-6)
    for b, p in enumerate(pos.tolist()):
        assert torch.allclose(kc[b, p], rot.apply(k_ref.view(B, 1, Hkv, D), pos[:, None])[b, 0], atol=1e-6)
        assert torch.equal(vc[b, p], v_ref.view(B, Hkv, D)[b])
        others = [i for i in range(L) if i != p]
        assert kc[b, others].abs().sum() == 0 and vc[b, others].abs().sum() == 0  # nothing else written


def test_rope_append_into_the_int8_cache_quantizes_as_the_torch_path():
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, D, L = 3, 4, 2, 16, 12
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=g)
    qkv[:, Hq * D:(Hq + Hkv) * D] += 5.0  # keys with an offset: the mean is subtracted before rounding
    pos = torch.tensor([0, 5, 11])
    cos, sin = Rotary(D, 10000.0).tables(L, torch.device("cpu"), torch.float32)
    kc, vc = torch.zeros(B, L, Hkv, D), torch.zeros(B, L, Hkv, D)
    q = tf.rope_append(qkv, cos, sin, pos, kc, vc, Hq, Hkv)  # the 16-bit append: rotated k, v
    c = Int8KV.zeros(B, L, Hkv, D, "cpu")
    c.k_mean.normal_(generator=g)
    c.k_mean += 5.0
    assert torch.equal(tf.rope_append(qkv, cos, sin, pos, c.k, c.v, Hq, Hkv, int8=c), q)
    rows = torch.arange(B)
    k8, ks = quantize_tokens(kc[rows, pos], c.k_mean)
    v8, vs = quantize_tokens(vc[rows, pos])
    for got, want in ((c.k[rows, pos], k8), (c.k_scale[rows, pos], ks), (c.v[rows, pos], v8),
                      (c.v_scale[rows, pos], vs)):
        assert torch.equal(got, want)
    assert c.k.abs().sum() == c.k[rows, pos].abs().sum()  # nothing else written


def test_fused_decode_over_the_int8_cache_equals_the_torch_path():
    from fastattn_dist.models.decode import FusedDecode, OneTierDecode

    ids = torch.tensor([[1, 40, 77, 13, 99, 7, 300], [1, 5, 9, 0, 0, 0, 0]])
    (ref, ref_cache), (got, got_cache) = decode_runs(
        lambda: LlamaForCausalLM.from_pretrained(tiny_checkpoint(), kv_dtype="int8"), (OneTierDecode, FusedDecode),
        ids, [7, 3], 32, 6)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    for li in range(len(ref_cache.q8)):
        a, b = ref_cache.q8[li], got_cache.q8[li]
        assert (a.k.int() - b.k.int()).abs().max() <= 1 and (a.v.int() - b.v.int()).abs().max() <= 1
        assert torch.allclose(a.k_scale, b.k_scale) and torch.allclose(a.v_scale, b.v_scale)


def test_silu_mul():
    gu = torch.randn(4, 2 * 1500)
    g, u = gu.chunk(2, -1)
    assert torch.allclose(tf.silu_mul(gu), torch.nn.functional.silu(g) * u, atol=1e-6)


def test_fused_decode_steps_equal_the_torch_path():
    """Ten decode steps of the tiny model through both paths, from the same prefill: logits and caches agree."""
    path = tiny_checkpoint()
    ids = torch.tensor([[1, 40, 77, 13, 99, 7, 300], [1, 5, 9, 0, 0, 0, 0]])
    lengths = [7, 3]
    from fastattn_dist.models.decode import FusedDecode, OneTierDecode

    (ref, ref_cache), (got, got_cache) = decode_runs(lambda: LlamaForCausalLM.from_pretrained(path),
                                                     (OneTierDecode, FusedDecode), ids, lengths, 32, 10)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    assert torch.equal(got_cache.lengths, ref_cache.lengths)
    for li in range(len(ref_cache.k)):
        assert torch.allclose(got_cache.k[li], ref_cache.k[li], atol=1e-5)
        assert torch.allclose(got_cache.v[li], ref_cache.v[li], atol=1e-6)


def test_generate_stats_describe_one_call():
    """A stats object reused over calls counts each call's decode steps afresh (a reuse once doubled the rate)."""
    from fastattn_dist.models.generate import GenerateStats

    m = LlamaForCausalLM.from_pretrained(tiny_checkpoint())
    st = GenerateStats()
    for _ in range(2):
        m.generate([[1, 5, 9]], 6, stop_tokens=[], stats=st)
        assert st.decode_steps == 5 and st.new_tokens == 5 and st.prompt_tokens == 3


@pytest.mark.parametrize("name,gpu_tokens,share", [
    ("llama_gqa", 13, 0.5),       # the longer prompt spills to the host tier, split between CPU and stream
    ("llama_gqa", 5, 0.0),        # most of both prompts on the host, all streamed
    ("mistral_window", 9, 1.0),   # a sliding window across the boundary, the host part on the CPU
])
def test_fused_tiered_decode_equals_the_torch_tiered_path(tmp_path, name, gpu_tokens, share):
    """The fused layer loop over a device + host cache (FusedTieredDecode; its new key and value reach the tiers
    through a scratch token) against TieredDecode from the same prefill: logits and both tiers agree."""
    transformers = pytest.importorskip("transformers")  # noqa: F841  (make_checkpoint writes with it)
    sys.path.insert(0, os.path.dirname(__file__))
    from test_llama import PROMPTS, make_checkpoint
    from fastattn_dist.models.decode import FusedTieredDecode, TieredDecode

    path = make_checkpoint(tmp_path, name)[1]
    S = max(len(p) for p in PROMPTS)
    ids = torch.tensor([p + [0] * (S - len(p)) for p in PROMPTS])
    (ref, ref_c), (got, got_c) = decode_runs(
        lambda: LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, kv_offload=gpu_tokens),
        (TieredDecode, FusedTieredDecode), ids, [len(p) for p in PROMPTS], S + 8, 6, share)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    assert got_c.host_lengths == ref_c.host_lengths and torch.equal(got_c.lengths, ref_c.lengths)
    for a, b in zip(ref_c.k + ref_c.v + ref_c.host_k + ref_c.host_v, got_c.k + got_c.v + got_c.host_k + got_c.host_v):
        assert torch.allclose(a, b, atol=1e-5)
