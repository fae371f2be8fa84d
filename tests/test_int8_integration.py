"""8-bit attention plugged in (CPU: the torch model of the kernel's arithmetic): ``attention(precision=...)`` and
select.py's decisions, the tiled block with 8-bit tiles, the model's prefill with 8-bit attention, the int8 KV
cache and its decode, and the CLI's errors. The kernels themselves are tested in test_quantized_attention.py
(Triton interpreter); the split-K int8 decode kernel and the fused append in test_decode_attention.py and
models/test_fused_decode.py.
"""
import json

import pytest
import torch

import fastattn_dist as fa
from conftest import run_cli
from fastattn_dist import KeyPadding, SlidingWindow, spawn_ranks
from fastattn_dist.attention import quantized as qz
from fastattn_dist.attention import select
from fastattn_dist.attention.int8_kv import Int8KV
from fastattn_dist.kv import LayerKV, QuantizedLayerKV
from fastattn_dist.masks import Mask, resolve_mask
from fastattn_dist.models.kv_cache import Int8KVCache, KVCache
from fastattn_dist.models.llama import LlamaForCausalLM
from fastattn_dist.models.tiny import tiny_checkpoint
from fastattn_dist.reference_block import attention64, reference_block
from rank_jobs import block_grid, make_input, make_weights

# -- bounds, stated once (measured on this CPU path; the bounds leave headroom) ------------------------------------
# ||out - ref|| / ||ref|| of attention() against float64 (test_quantized_attention.py measures the same)
ATTN_ERR = {"int8": 0.025, "int8-fp8": 0.05, "fp8": 0.075}
# the block (hidden 256, 8 heads / 2 kv heads, head_dim 32, RoPE) against the fp32 block, norm-relative
# (measured 0.0124 int8, 0.0316 int8-fp8, 0.0433 fp8 causal; 0.0145 / 0.0321 / 0.0470 unmasked)
BLOCK_ERR = {"int8": 0.025, "int8-fp8": 0.05, "fp8": 0.07}
# the tiny model's prefill logits against fp32 attention: norm-relative error, share of positions whose top-1
# token is unchanged (measured 2 x 200 tokens: 0.0092 / 98.0% int8, 0.0363 / 94.3% int8-fp8, 0.0354 / 93.8% fp8)
MODEL_ERR = {"int8": 0.02, "int8-fp8": 0.06, "fp8": 0.06}
MODEL_TOP1 = {"int8": 0.95, "int8-fp8": 0.88, "fp8": 0.88}
# int8 KV cache: prefill + 10 greedy decode steps of the tiny model against the fp32 cache (measured 0.0052)
KV_ERR = 0.02


def qkv(B, Sq, Sk, Hq, Hkv, D, seed=0, dtype=torch.float32, outliers=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, h, D, generator=g) for n, h in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv)))
    if outliers:
        k[..., :4] += 10.0
    return q.to(dtype), k.to(dtype), v.to(dtype)


def norm_rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------------------
# attention(precision=...) and select.py
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", qz.PRECISIONS)
@pytest.mark.parametrize("mask", ["causal", "none", SlidingWindow(9), KeyPadding([50, 113])], ids=str)
def test_attention_precision_is_the_quantized_model_with_the_attention_contract(precision, mask):
    """On CPU ``precision`` runs the torch model of the kernel: same numbers, LSE, GQA, q_offset, out= slices."""
    B, Sq, Sk, off = 2, 37, 113, 76
    q, k, v = qkv(B, Sq, Sk, 8, 2, 64)
    buf = torch.zeros(B, Sq + 4, 8 * 64)
    view = buf[:, 2:Sq + 2].view(B, Sq, 8, 64)
    out, lse = fa.attention(q, k, v, mask, q_offset=off, precision=precision, return_lse=True, out=view)
    want, want_lse = qz.quantized_attention_torch(q, k, v, mask, q_offset=off, precision=precision, return_lse=True)
    assert out.data_ptr() == view.data_ptr() and torch.equal(out, want) and torch.equal(lse, want_lse)
    assert buf[:, :2].abs().sum() == 0 and buf[:, Sq + 2:].abs().sum() == 0
    ref, ref_lse = attention64(q, k, v, mask, q_offset=off, return_lse=True)
    assert norm_rel(out, ref) <= ATTN_ERR[precision]
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse)) and (lse.double()[fin] - ref_lse[fin]).abs().max() < 0.1


def test_default_precision_is_unchanged():
    q, k, v = qkv(1, 20, 20, 4, 2, 32)
    assert torch.equal(fa.attention(q, k, v), fa.attention(q, k, v, precision="bf16"))
    assert torch.equal(fa.attention(q, k, v), fa.attention(q, k, v, backend="torch"))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "cudnn"])
def test_no_8bit_path_is_a_one_line_value_error(backend):
    q, k, v = qkv(1, 8, 8, 2, 1, 32)
    with pytest.raises(ValueError, match="runs on attention backend auto, triton or torch") as e:
        fa.attention(q, k, v, backend=backend, precision="int8")
    assert "\n" not in str(e.value)


def test_bad_precision_and_inputs_raise_value_errors():
    q, k, v = qkv(1, 8, 8, 2, 1, 32)
    with pytest.raises(ValueError, match="unknown attention precision 'int4'"):
        fa.attention(q, k, v, precision="int4")
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        fa.attention(q.double(), k.double(), v.double(), precision="int8")
    with pytest.raises(ValueError, match="unknown attention precision"):
        select.kernel_for("auto", q, k, resolve_mask("causal"), 0, False, "int4")


def test_select_decides_the_8bit_kernel(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    q, k = torch.zeros(1, 4, 2, 32), torch.zeros(1, 4, 1, 32)
    m = resolve_mask("causal")
    assert select.kernel_for("auto", q, k, m, 0, False, "int8") == "quantized-torch"
    assert select.kernel_for("torch", q, k, m, 0, True, "fp8") == "quantized-torch"
    assert select.resolve_backend("auto", gpu, "int8") == "triton"  # not cudnn: it has no 8-bit path
    assert select.resolve_backend("auto", cpu, "int8-fp8") == "torch"
    assert select.available("auto", cpu, "fp8") is None and select.available("torch", gpu, "int8") is None
    for cap, precision, ok in (((9, 0), "fp8", True), ((8, 9), "int8-fp8", True), ((8, 0), "int8", True),
                               ((8, 6), "fp8", False), ((7, 5), "int8", False)):
        monkeypatch.setattr(select, "_capability", lambda device, cap=cap: cap)
        why = select.available("auto", gpu, precision)
        assert (why is None) == ok, (cap, precision, why)
        if not ok:
            assert "compute capability" in why and "\n" not in why
    monkeypatch.setattr(select, "_capability", lambda device: (8, 6))
    assert "use precision 'int8'" in select.available("triton", gpu, "fp8")


# ------------------------------------------------------------------------------------------------
# the block: 8-bit tiles
# ------------------------------------------------------------------------------------------------

H, HEADS, KV_HEADS = 256, 8, 2


def block(precision, **kw):
    b = fa.TPAttention(H, HEADS, KV_HEADS, tiles=1, rope_theta=1e4, attn_precision=precision, **kw)
    b.load_full_weights(*make_weights(H, HEADS, KV_HEADS))
    return b


@pytest.mark.parametrize("precision", qz.PRECISIONS)
@pytest.mark.parametrize("mask", ["causal", "none", KeyPadding([200, 300])], ids=str)
def test_block_8bit_tiles_against_the_fp32_block(precision, mask):
    x = make_input(2, 300, H)
    ref = block("bf16")(x, mask=mask, tiles=1)
    b = block(precision)
    one, three = b(x, mask=mask, tiles=1), b(x, mask=mask, tiles=3)
    assert b.last_plan.num_tiles == 3
    assert norm_rel(one, ref) <= BLOCK_ERR[precision]
    # every tile reads one quantization of the call's keys: tiling moves only the o_proj GEMM's fp32 rounding
    assert (three - one).abs().max() <= 1e-6 * one.abs().max()


def test_complete_sink_quantizes_once_for_every_row_tile(monkeypatch):
    """The drop-in property itself: through the block's sink, every tile (any cut, any q_offset, any sequence) reads
    one quantization of the call's keys, so rows attended in tiles equal the same rows attended at once. (Up to
    float32 ulps on this CPU path: torch's vectorised exp2 rounds a tensor's tail elements apart from its body, so
    a row's last bit can depend on the tensor's shape; the integers and scales are the same.)"""
    import fastattn_dist.kv as kv_mod
    calls = []
    quantize = kv_mod.quantize_kv_for
    monkeypatch.setattr(kv_mod, "quantize_kv_for", lambda *a, **kw: calls.append(a[0]) or quantize(*a, **kw))
    q, k, v = qkv(2, 300, 300, 8, 2, 32, seed=3)
    m = KeyPadding([211, 300])
    sink = QuantizedLayerKV(LayerKV(k, v), "int8", complete=True, key_lengths=m.key_lengths)
    whole = sink.attend(q, 0, 2, 0, 300, m, "auto")
    for b0, b1 in ((0, 1), (1, 2)):
        for r0, r1 in ((0, 7), (7, 150), (150, 300)):
            part = sink.attend(q[b0:b1, r0:r1], b0, b1, r0, 300, m.slice_batch(b0, b1), "auto")
            assert (part - whole[b0:b1, r0:r1]).abs().max() <= 1e-6 * whole.abs().max()
    assert calls == ["quantized-torch"]  # one quantization served all seven calls


def test_open_sink_quantizes_the_keys_each_call_needs():
    """The model's sink: after each write, an attend quantizes the keys [0, key_end) it sees, once."""
    q, k, v = qkv(1, 90, 90, 4, 2, 32, seed=4)
    m = Mask(True, None, None)
    sink = QuantizedLayerKV(LayerKV.empty(1, 128, 2, 32, torch.float32, "cpu"), "int8")
    for r0, r1 in ((0, 30), (30, 90)):
        sink.write(0, 1, r0, k[:, r0:r1], v[:, r0:r1])
        got = sink.attend_written(q[:, r0:r1], k[:, r0:r1], v[:, r0:r1], 0, 1, r0, m, "auto")
        want = qz.quantized_attention_torch(q[:, r0:r1], k[:, :r1], v[:, :r1], "causal", q_offset=r0)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="nothing to write"):
        QuantizedLayerKV(LayerKV(k, v), "int8", complete=True).write(0, 1, 0, k, v)


def test_block_rejects_precisions_it_cannot_run():
    with pytest.raises(ValueError, match="auto, triton or torch"):
        fa.TPAttention(H, HEADS, KV_HEADS, backend="reference", attn_precision="int8")
    with pytest.raises(ValueError, match="unknown attention precision"):
        fa.TPAttention(H, HEADS, KV_HEADS, attn_precision="int4")
    assert "attn_precision=int8" in repr(block("int8"))


@pytest.mark.slow
def test_block_8bit_on_two_ranks_equals_one_rank():
    """Each rank holds half the kv heads; quantization is per (sequence, kv head): a rank's shard is quantized as
    the whole block's is, and the tiled TP=2 block equals the single-device one up to the all-reduce's rounding."""
    case = dict(hidden=H, heads=HEADS, kv_heads=KV_HEADS, batch=2, seq=70, mask="causal", rope=1e4,
                tiles=(1, 3), attn_precision="int8")
    res = spawn_ranks(block_grid, 2, ([("int8", case)],), timeout_s=90)
    x = make_input(2, 70, H)
    one = block("int8")(x, tiles=1)
    ref = reference_block(x, *make_weights(H, HEADS, KV_HEADS), HEADS, KV_HEADS, mask="causal", rope_theta=1e4)
    for tiles in (1, 3):
        out = res[0]["int8"][tiles][0]
        assert (out - one).abs().max() <= 1e-5 * one.abs().max() and torch.equal(out, res[1]["int8"][tiles][0])
        assert norm_rel(out, ref) <= BLOCK_ERR["int8"]


# ------------------------------------------------------------------------------------------------
# the model: prefill with 8-bit attention, the int8 KV cache
# ------------------------------------------------------------------------------------------------

PROMPT = torch.randint(3, 512, (2, 200), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_logits():
    return LlamaForCausalLM.from_pretrained(tiny_checkpoint(), tiles=3)(PROMPT)


@pytest.mark.parametrize("precision", qz.PRECISIONS)
def test_tiny_model_prefill_with_8bit_attention(tiny_logits, precision):
    m = LlamaForCausalLM.from_pretrained(tiny_checkpoint(), tiles=3, attn_precision=precision)
    assert all(layer.attn.attn_precision == precision for layer in m.layers)
    logits = m(PROMPT)
    assert m.last_plan.num_tiles == 3
    err = norm_rel(logits, tiny_logits)
    top1 = (logits.argmax(-1) == tiny_logits.argmax(-1)).double().mean().item()
    assert err <= MODEL_ERR[precision] and top1 >= MODEL_TOP1[precision], (err, top1)


def greedy(model, ids, lengths, steps):
    model.reset_cache(ids.shape[0], 128)
    out = [model.prefill(ids, lengths)]
    for _ in range(steps):
        out.append(model.decode_step(out[-1].argmax(-1)))
    return torch.stack(out)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_int8_kv_cache_decode_against_the_fp32_cache(precision):
    ids = torch.tensor([[1, 40, 77, 13, 99, 7, 300] * 10, [1, 5, 9, 0, 0, 0, 0] * 10])
    path = tiny_checkpoint()
    ref = greedy(LlamaForCausalLM.from_pretrained(path, tiles=3), ids, [70, 33], 10)
    m = LlamaForCausalLM.from_pretrained(path, tiles=3, kv_dtype="int8", attn_precision=precision)
    got = greedy(m, ids, [70, 33], 10)
    assert isinstance(m.cache, Int8KVCache) and m.cache.k[0].dtype == torch.int8
    assert norm_rel(got, ref) <= KV_ERR
    assert torch.equal(got.argmax(-1), ref.argmax(-1))  # the same greedy tokens


def test_int8_cache_holds_about_half_the_bytes():
    L, B, S, Hkv, D = 2, 2, 1024, 8, 128
    bf16 = KVCache(L, B, S, Hkv, D, torch.bfloat16, "cpu")
    int8 = Int8KVCache(L, B, S, Hkv, D, torch.bfloat16, "cpu")
    per_token = L * 2 * Hkv * (D + 4)  # int8 K and V plus one fp32 scale each per (token, kv head)
    assert int8.nbytes == B * S * per_token + L * B * Hkv * D * 4  # + the fp32 smoothing means
    assert int8.nbytes / bf16.nbytes < 0.52
    assert Int8KVCache.bytes_per_token(L, Hkv, D) == per_token


def test_int8_kv_rounds_each_token_alone_and_smooths_keys():
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 40, 2, 64, generator=g), torch.randn(1, 40, 2, 64, generator=g)
    k[..., :4] += 10.0
    c = Int8KV.zeros(1, 48, 2, 64, "cpu")
    c.write(0, 1, 0, k[:, :10], v[:, :10])  # the first write fixes the mean: the first tile's keys
    c.write(0, 1, 10, k[:, 10:], v[:, 10:])
    assert torch.allclose(c.k_mean, k[:, :10].mean(1)) and c.mean_fixed == [True]
    kd, vd = c.rows(0, 1, 40, torch.float32)
    # error <= half a step of each token's own scale; smoothing makes the key steps ~10x finer than unsmoothed
    assert ((kd - k).abs() <= c.k_scale[:, :40, :, None] * 0.5 + 1e-6).all()
    assert ((vd - v).abs() <= c.v_scale[:, :40, :, None] * 0.5 + 1e-6).all()
    assert c.k_scale[:, :40].mean() < 0.25 * (k.abs().amax(-1) / 127).mean()
    c.append(torch.tensor([0]), torch.tensor([40]), k[:, :1], v[:, :1])  # decode: same rounding, same mean
    assert torch.equal(c.k[:, 40], c.k[:, 0]) and torch.equal(c.v_scale[:, 40], c.v_scale[:, 0])
    c.reset()
    assert c.mean_fixed == [False]


def test_model_rejects_what_it_cannot_run():
    path = tiny_checkpoint()
    with pytest.raises(ValueError, match="attn_precision must be one of"):
        LlamaForCausalLM.from_pretrained(path, attn_precision="int4")
    with pytest.raises(ValueError, match="kv_dtype must be"):
        LlamaForCausalLM.from_pretrained(path, kv_dtype="int4")
    with pytest.raises(ValueError, match="host tier"):
        LlamaForCausalLM.from_pretrained(path, kv_dtype="int8", kv_offload=16)
    with pytest.raises(ValueError, match="auto, triton or torch"):
        LlamaForCausalLM.from_pretrained(path, attn_precision="int8", attn_backend="reference")


# ------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["demo", "--attn-precision", "int8", "--attn-backend", "reference"], "auto, triton or torch"),
    (["demo", "--attn-precision", "int4"], "invalid choice"),
    (["profile", "--attn-precision", "fp4", "--out", "x"], "invalid choice"),
    (["generate", "--model", "tiny", "--prompt-ids", "1,2", "--attn-precision", "int4"], "invalid choice"),
    (["bench-model", "--attn-precision", "int4"], "invalid choice"),
])
def test_cli_attn_precision_errors_are_one_line(args, match):
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr


def test_demo_runs_int8_tiles():
    r = run_cli("demo", "--world-size", "1", "--seq", "96", "--hidden", "128", "--heads", "8", "--kv-heads", "4",
                "--tiles", "3", "--repeats", "1", "--warmup", "0", "--attn-precision", "int8", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["config"]["attn_precision"] == "int8" and s["num_tiles"] == 3
    assert 1e-4 < s["max_rel_err"] < 0.05  # quantized, against the float64 reference (max-relative)
