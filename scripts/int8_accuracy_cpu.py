"""What 8-bit attention and the int8 KV cache cost in accuracy, measured on CPU (the torch model of the kernel's
arithmetic, which the Triton kernel matches under the interpreter): the numbers docs/int8_attention.md quotes.

    python scripts/int8_accuracy_cpu.py [--out DIR] [--no-7b]     # about 5 minutes on 2 cores

1. attention against float64 (causal, 1 x 1024 tokens, 8 heads / 2 kv heads, head_dim 128): Gaussian q, k, v,
   and k with a 10-sigma offset on 4 channels; int8, int8-fp8, fp8, int8 without K smoothing, and naive
   per-tensor fp8 (Q, K, V each rounded to e4m3 with one scale, then exact attention);
2. the block (TP=1, hidden 2048, 16 heads / 4 kv heads, 1 x 1024 tokens, RoPE, causal) against the fp32 block,
   and 4 tiles against 1;
3. the tiny checkpoint's prefill logits (2 x 512 tokens) with 8-bit attention against fp32 attention: norm-relative
   error and the share of positions whose top-1 token is unchanged; the same for a 2-layer slice of the 7b shape
   with random weights (1 x 512 tokens; ``--no-7b`` skips it);
4. the int8 KV cache: the tiny model's decode logits over 32 steps fed the same tokens, against the fp32 cache,
   and the cache's bytes against a 16-bit cache at the 7b shape.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import fastattn_dist as fa  # noqa: E402
from fastattn_dist.attention import quantized as qz  # noqa: E402
from fastattn_dist.models.kv_cache import Int8KVCache, KVCache  # noqa: E402
from fastattn_dist.models.llama import LlamaForCausalLM  # noqa: E402
from fastattn_dist.models.presets import preset_config  # noqa: E402
from fastattn_dist.models.tiny import tiny_checkpoint  # noqa: E402
from fastattn_dist.reference_block import attention64  # noqa: E402

PRECISIONS = ("int8", "int8-fp8", "fp8")


def norm_rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def top1(a, b) -> float:
    return (a.argmax(-1) == b.argmax(-1)).double().mean().item()


def attention_errors():
    out = {}
    for outliers in (False, True):
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, 1024, h, 128, generator=g) for h in (8, 2, 2))
        if outliers:
            k[..., torch.randperm(128, generator=g)[:4]] += 10.0
        ref = attention64(q, k, v, "causal")
        row = {p: norm_rel(fa.attention(q, k, v, "causal", precision=p), ref) for p in PRECISIONS}
        row["int8 unsmoothed"] = norm_rel(qz.quantized_attention_torch(q, k, v, "causal", smooth_k=False), ref)
        row["naive fp8"] = norm_rel(qz.naive_fp8_attention_torch(q, k, v, "causal"), ref)
        out["outliers" if outliers else "gaussian"] = row
    return out


def block_errors():
    H, heads, kv, S = 2048, 16, 4, 1024
    g = torch.Generator().manual_seed(2)
    w = [torch.randn(n, H, generator=g) * H ** -0.5 for n in (H, kv * 128, kv * 128)] + \
        [torch.randn(H, H, generator=g) * H ** -0.5]
    x = torch.randn(1, S, H, generator=g)
    outs = {}
    for p in ("bf16",) + PRECISIONS:
        b = fa.TPAttention(H, heads, kv, tiles=1, rope_theta=1e4, attn_precision=p)
        b.load_full_weights(*w)
        outs[p] = (b(x, tiles=1), b(x, tiles=4))
    ref = outs["bf16"][0]
    return {p: {"vs_fp32_block": norm_rel(outs[p][0], ref),
                "tiles4_vs_tiles1_max_rel": ((outs[p][1] - outs[p][0]).abs().max() / outs[p][0].abs().max()).item()}
            for p in outs}


def model_errors(make, ids):
    ref = make("bf16")(ids)
    res = {}
    for p in PRECISIONS:
        logits = make(p)(ids)
        res[p] = {"logits_err": norm_rel(logits, ref), "top1_unchanged": top1(logits, ref)}
    return res


def kv_cache_errors():
    path = tiny_checkpoint()
    ids = torch.randint(3, 512, (2, 256), generator=torch.Generator().manual_seed(3))
    forced = torch.randint(3, 512, (32, 2), generator=torch.Generator().manual_seed(4))
    runs = {}
    for kv in (None, "int8"):
        m = LlamaForCausalLM.from_pretrained(path, kv_dtype=kv)
        m.reset_cache(2, 300)
        steps = [m.prefill(ids)] + [m.decode_step(t) for t in forced]
        runs[kv] = torch.stack(steps)
    ref, got = runs[None], runs["int8"]
    s = preset_config("7b")
    D, Hkv, L = s.head_dim, s.num_key_value_heads, s.num_hidden_layers
    bf16 = KVCache(L, 1, 16, Hkv, D, torch.bfloat16, "cpu").nbytes
    int8 = Int8KVCache(L, 1, 16, Hkv, D, torch.bfloat16, "cpu").nbytes - L * Hkv * D * 4  # per-token part only
    return {"prefill_logits_err": norm_rel(got[0], ref[0]), "decode_logits_err": norm_rel(got[1:], ref[1:]),
            "decode_top1_unchanged": top1(got[1:], ref[1:]), "bytes_vs_16bit_7b": int8 / bf16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for int8_accuracy_cpu.json")
    ap.add_argument("--no-7b", action="store_true", help="skip the 2-layer 7b slice (3 GB, the slowest part)")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    t0 = time.time()
    res = {"attention_vs_float64": attention_errors()}
    print("attention", json.dumps(res["attention_vs_float64"], indent=1), flush=True)
    res["block_vs_fp32_block"] = block_errors()
    print("block", json.dumps(res["block_vs_fp32_block"], indent=1), flush=True)
    tiny = tiny_checkpoint()
    ids = torch.randint(3, 512, (2, 512), generator=torch.Generator().manual_seed(0))
    res["tiny_model"] = model_errors(lambda p: LlamaForCausalLM.from_pretrained(tiny, tiles=3, attn_precision=p), ids)
    print("tiny model", json.dumps(res["tiny_model"], indent=1), flush=True)
    if not a.no_7b:
        cfg = preset_config("7b").replace(num_hidden_layers=2)

        def make7b(p):
            m = LlamaForCausalLM(cfg, tiles=3, attn_precision=p, max_seq_len=512)
            m.init_random_weights(0)
            return m
        ids7 = torch.randint(3, cfg.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
        res["7b_2layers_random"] = model_errors(make7b, ids7)
        print("7b slice", json.dumps(res["7b_2layers_random"], indent=1), flush=True)
    res["int8_kv_cache"] = kv_cache_errors()
    print("int8 KV cache", json.dumps(res["int8_kv_cache"], indent=1), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    res["torch"] = torch.__version__
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "int8_accuracy_cpu.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(f"done in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
