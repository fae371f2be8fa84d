"""8-bit attention in the tiled block and in the model, on one H100/H200, against bf16, in the same run.

1. The block at one rank's shape of TP=4 with hidden 8192, 64 heads / 8 kv heads (16 heads, 2 kv heads, head_dim
   128 on the rank): ``TPAttention(..., comm=NoComm(4, 0)).attend(q, k, v)`` (attention -> o_proj, comm off), causal,
   S = 8K and 32K, tiles 1 and 4, attn_precision bf16 (backend auto: cuDNN on Hopper), int8, int8-fp8, fp8. The
   8-bit blocks quantize K/V once per call (kv.QuantizedLayerKV), included in the time.
2. The model, 7b-shaped with random weights (models/presets.py), one rank: prefill at the context (``forward``,
   last token's logits) with int8 attention against bf16, and decode with the int8 KV cache against the bf16
   cache (``generate``, CUDA-graph steps, the second of two runs): tokens/s. One model at a time (about 15 GB of
   weights plus the cache: 4.3 GB bf16, 2.2 GB int8 at 32K; the preset's position limit is raised to fit the
   context and the decode steps: the weights are random).

    python scripts/bench_int8_block_model.py --out DIR            # the above (not run yet: 3-5 minutes expected)
    python scripts/bench_int8_block_model.py --quick --out DIR    # S = 8K block, model at 8K, 16 decode steps
    python scripts/bench_int8_block_model.py --smoke --out DIR    # CPU: tiny shapes, the script's own paths

Self-checking (exit status 1 on a failed check), everything to stdout and to ``--out`` (JSON, markdown):

* block: each 8-bit output against the bf16 block's (norm-relative, bound per precision); 4 tiles against 1 tile
  of the same precision (every tile reads the same quantization: they differ only by the o_proj GEMM's bf16
  rounding per tile, as the bf16 block's two do);
* model: prefill logits of int8 attention against bf16 on a 4K prompt (norm-relative error, share of positions
  whose top-1 token is unchanged), and at the context (last token); decode logits with the int8 cache against the
  bf16 cache over 8 steps fed the same tokens.

The 8-bit kernel runs one pinned config (``--int8-config``, default 128,64,8,3: autotuning every tile's shape
bucket would compile for minutes); scripts/bench_int8_attention.py times the configs one by one.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from fastattn_dist import TPAttention  # noqa: E402
from fastattn_dist.attention import available  # noqa: E402
from fastattn_dist.models.generate import GenerateStats  # noqa: E402
from fastattn_dist.models.llama import LlamaForCausalLM  # noqa: E402
from fastattn_dist.models.presets import preset_config  # noqa: E402
from fastattn_dist.models.tiny import tiny_checkpoint  # noqa: E402
from fastattn_dist.parallel.comm import NoComm  # noqa: E402
from fastattn_dist.runner import median_ms  # noqa: E402

PRECISIONS = ("bf16", "int8", "int8-fp8", "fp8")
# norm-relative error against the bf16 result (which is itself ~0.3-0.5% off exact): the 8-bit kernels' errors
# against float32 (bench_int8_attention.py: int8 ~0.02, int8-fp8 ~0.036, fp8 ~0.05 with K outliers), plus headroom
BLOCK_ERR = {"int8": 0.035, "int8-fp8": 0.06, "fp8": 0.08}
TILED_TOL = 0.01     # 4 tiles vs 1 tile of one precision: the o_proj GEMM's bf16 rounding per tile
MODEL_ERR, MODEL_TOP1 = 0.05, 0.8   # int8 attention vs bf16, model logits (random weights: a sanity bound)
DECODE_ERR = 0.05    # int8 KV cache vs bf16 cache, decode logits
OUTLIER_CHANNELS, OUTLIER_SIGMA = 4, 10.0


def norm_rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def block_inputs(S, heads, kv_heads, D, hidden, device, dtype, seed=0):
    """q, k, v of one rank (k with channel outliers, as real keys have) and its o_proj columns."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, S, heads, D, generator=g, device=device)
    k = torch.randn(1, S, kv_heads, D, generator=g, device=device)
    k[..., :OUTLIER_CHANNELS] += OUTLIER_SIGMA
    v = torch.randn(1, S, kv_heads, D, generator=g, device=device)
    wo = torch.randn(hidden, heads * D, generator=g, device=device) * (heads * D) ** -0.5
    return [t.to(dtype) for t in (q, k, v, wo)]


def bench_block(shape, seqs, tiles, device, dtype, repeats, checks, log):
    hidden, heads, kv_heads, world = shape
    local, local_kv, D = heads // world, kv_heads // world, hidden // heads
    rows = []
    for S in seqs:
        q, k, v, wo = block_inputs(S, local, local_kv, D, hidden, device, dtype)
        outs, row = {}, {"S": S, "ms": {}, "err_vs_bf16": {}, "tiled_vs_untiled": {}, "skipped": {}}
        for prec in PRECISIONS:
            why = available("auto", device, prec)
            if why:
                row["skipped"][prec] = why
                continue
            blk = TPAttention(hidden, heads, kv_heads, tiles=1, dtype=dtype, device=device, comm=NoComm(world, 0),
                              attn_precision=prec)
            blk.load_o_proj_shard(wo)
            for t in (1, tiles):
                outs[(prec, t)] = blk.attend(q, k, v, "causal", tiles=t).clone()
                row["ms"][f"{prec} t{t}"] = median_ms(lambda: blk.attend(q, k, v, "causal", tiles=t), device,
                                                      repeats, 1)
            row["tiled_vs_untiled"][prec] = norm_rel(outs[(prec, tiles)], outs[(prec, 1)])
            checks.append((f"block S={S} {prec}: {tiles} tiles vs 1", row["tiled_vs_untiled"][prec], TILED_TOL))
            if prec != "bf16":
                row["err_vs_bf16"][prec] = norm_rel(outs[(prec, 1)], outs[("bf16", 1)])
                checks.append((f"block S={S} {prec} vs bf16", row["err_vs_bf16"][prec], BLOCK_ERR[prec]))
            log(f"  block S={S} {prec}: " + ", ".join(f"tiles {t} {row['ms'][f'{prec} t{t}']:.3f} ms"
                                                      for t in (1, tiles)))
            del blk
        rows.append(row)
        del q, k, v, wo, outs
    return rows


def build(cfg_or_path, device, dtype, max_seq_len, **kw) -> LlamaForCausalLM:
    if isinstance(cfg_or_path, str):
        return LlamaForCausalLM.from_pretrained(cfg_or_path, dtype=dtype, device=device, max_seq_len=max_seq_len, **kw)
    m = LlamaForCausalLM(cfg_or_path, dtype=dtype, device=device, max_seq_len=max_seq_len, **kw)
    m.init_random_weights(0)
    return m


def forced_decode(model, ids, tokens):
    """Prefill ``ids``, then decode ``tokens`` one by one (the same tokens for every variant): stacked logits."""
    model.reset_cache(1, ids.shape[1] + len(tokens) + 1)
    out = [model.prefill(ids)]
    for t in tokens:
        out.append(model.decode_step(torch.tensor([t], device=ids.device)))
    return torch.stack(out)


def model_variant(name, cfg, device, dtype, ctx, acc_len, steps, repeats, ids, kw, log):
    """One model configuration: prefill ms at ``ctx``, full logits at ``acc_len``, forced-decode logits, tokens/s."""
    t0 = time.time()
    m = build(cfg, device, dtype, ctx + steps + 2, **kw)
    res = {"kwargs": {k: v for k, v in kw.items()}}
    with torch.no_grad():
        res["prefill_ms"] = median_ms(lambda: m(ids, last_only=True), device, repeats, 1)
        res["prefill_last"] = m(ids, last_only=True).float().cpu()
        res["acc_logits"] = m(ids[:, :acc_len]).float().cpu()
        forced = [int(t) for t in torch.randint(3, 1000, (8,), generator=torch.Generator().manual_seed(1))]
        res["forced"] = forced_decode(m, ids, forced).float().cpu()
        st = GenerateStats()
        for _ in range(2):  # the first run captures the decode graph and warms up
            m.generate(ids, steps, stop_tokens=[], stats=st)
        res["decode_tokens_per_s"] = st.decode_tokens_per_s
        res["kv_cache_bytes"] = m.cache.nbytes
    log(f"  model {name}: prefill {ctx} tokens {res['prefill_ms']:.1f} ms, decode {res['decode_tokens_per_s']:.1f} "
        f"tokens/s, cache {res['kv_cache_bytes'] / 2**30:.2f} GiB ({time.time() - t0:.0f} s)")
    del m
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def bench_model(cfg, device, dtype, ctx, steps, repeats, checks, log):
    vocab = cfg.vocab_size if not isinstance(cfg, str) else 512
    ids = torch.randint(3, vocab, (1, ctx), generator=torch.Generator().manual_seed(0)).to(device)
    acc_len = min(ctx, 4096)
    variants = {"bf16": {}, "int8 attention": {"attn_precision": "int8"}, "int8 KV cache": {"kv_dtype": "int8"}}
    res = {n: model_variant(n, cfg, device, dtype, ctx, acc_len, steps, repeats, ids, kw, log)
           for n, kw in variants.items()}
    base, q_attn, q_kv = res["bf16"], res["int8 attention"], res["int8 KV cache"]
    summary = {
        "context": ctx, "decode_steps": steps, "accuracy_prompt": acc_len,
        "prefill_ms": {n: r["prefill_ms"] for n, r in res.items()},
        "decode_tokens_per_s": {n: r["decode_tokens_per_s"] for n, r in res.items()},
        "kv_cache_bytes": {n: r["kv_cache_bytes"] for n, r in res.items()},
        "int8_attention_logits_err": norm_rel(q_attn["acc_logits"], base["acc_logits"]),
        "int8_attention_top1_unchanged": (q_attn["acc_logits"].argmax(-1) == base["acc_logits"].argmax(-1))
        .double().mean().item(),
        "int8_attention_last_logits_err": norm_rel(q_attn["prefill_last"], base["prefill_last"]),
        "int8_kv_decode_logits_err": norm_rel(q_kv["forced"][1:], base["forced"][1:]),
    }
    checks += [("model int8 attention logits", summary["int8_attention_logits_err"], MODEL_ERR),
               ("model int8 attention last logits", summary["int8_attention_last_logits_err"], MODEL_ERR),
               ("model int8 attention top-1 changed", 1 - summary["int8_attention_top1_unchanged"],
                round(1 - MODEL_TOP1, 6)),
               ("model int8 KV decode logits", summary["int8_kv_decode_logits_err"], DECODE_ERR)]
    return summary


def markdown(meta, blocks, model, checks):
    T = meta["tiles"]
    L = ["# 8-bit attention in the block and the model", "", f"- command: `{meta['command']}`",
         f"- device: {meta['device']}; {meta['date']}; torch {meta['torch']}; {meta['seconds']} s",
         f"- checks: {sum(1 for c in checks if c[1] <= c[2])} of {len(checks)} passed", "",
         f"## Block: one rank of TP=4 (hidden {meta['block'][0]}, {meta['block'][1]} / {meta['block'][2]} heads), "
         "attend(), causal, comm off; ms (median)", "",
         "| S | " + " | ".join(f"{p} t1 | {p} t{T}" for p in PRECISIONS) + f" | bf16 / int8, t1 | bf16 / int8, t{T} |",
         "|---|" + "---|" * (2 * len(PRECISIONS) + 2)]
    for r in blocks:
        ms = r["ms"]

        def cell(key):
            return f"{ms[key]:.3f}" if key in ms else "-"

        def speedup(t):
            a, b = ms.get(f"bf16 t{t}"), ms.get(f"int8 t{t}")
            return f"{a / b:.2f}x" if a and b else "-"
        L.append(f"| {r['S']} | " + " | ".join(f"{cell(f'{p} t1')} | {cell(f'{p} t{T}')}" for p in PRECISIONS)
                 + f" | {speedup(1)} | {speedup(T)} |")
    if model:
        L += ["", f"## Model ({meta['model']}, one rank, context {model['context']})", "",
              "| variant | prefill ms | decode tokens/s | KV cache GiB |", "|---|---|---|---|"]
        for n in model["prefill_ms"]:
            L.append(f"| {n} | {model['prefill_ms'][n]:.1f} | {model['decode_tokens_per_s'][n]:.1f} | "
                     f"{model['kv_cache_bytes'][n] / 2**30:.2f} |")
        L += ["", f"int8 attention vs bf16: logits error {model['int8_attention_logits_err']:.2e} on a "
              f"{model['accuracy_prompt']}-token prompt, top-1 unchanged at {model['int8_attention_top1_unchanged']:.1%}"
              f" of positions; int8 KV cache vs bf16: decode logits error {model['int8_kv_decode_logits_err']:.2e}"]
    L += ["", "## Checks", ""] + [f"- {'ok' if v <= b else 'FAILED'}: {n}: {v:.3e} (bound {b})" for n, v, b in checks]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for bench_int8_block_model.{json,md}")
    ap.add_argument("--quick", action="store_true", help="S = 8K block, the model at 8K, 16 decode steps")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes and the tiny checkpoint")
    ap.add_argument("--seqs", type=int, nargs="+", help="block sequence lengths (default 8192 32768)")
    ap.add_argument("--tiles", type=int, default=4, help="the tiled run's tile count (default 4)")
    ap.add_argument("--context", type=int, help="model context (default 32768)")
    ap.add_argument("--decode-tokens", type=int, help="decode steps timed (default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per variant (default 5)")
    ap.add_argument("--model", default="7b", help="a preset shape (default 7b)")
    ap.add_argument("--layers", type=int, help="a slice of the model (default all its layers)")
    ap.add_argument("--no-model", action="store_true", help="the block only")
    ap.add_argument("--int8-config", default="128,64,8,3",
                    help="the 8-bit kernel's pinned config BM,BN,warps,stages[,tma] (FASTATTN_INT8_CONFIG)")
    a = ap.parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke on CPU)")
    os.environ.setdefault("FASTATTN_INT8_CONFIG", a.int8_config)
    t_start = time.time()
    device = torch.device("cpu" if a.smoke else "cuda")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    shape = (256, 16, 8, 4) if a.smoke else (8192, 64, 8, 4)
    seqs = a.seqs or ([96] if a.smoke else [8192] if a.quick else [8192, 32768])
    ctx = a.context or (160 if a.smoke else 8192 if a.quick else 32768)
    steps = a.decode_tokens or (4 if a.smoke else 16 if a.quick else 64)
    repeats = 2 if a.smoke else a.repeats
    log = lambda m: print(m, flush=True)  # noqa: E731
    log(f"bench_int8_block_model: {torch.cuda.get_device_name() if not a.smoke else 'CPU (smoke)'}, torch "
        f"{torch.__version__}")
    os.makedirs(a.out, exist_ok=True)
    checks = []
    blocks = bench_block(shape, seqs, a.tiles, device, dtype, repeats, checks, log)
    model = None
    if not a.no_model:
        cfg = tiny_checkpoint() if a.smoke else preset_config(a.model)
        if not a.smoke:  # random weights: the preset's position limit (32K for 7b) means nothing; room for decode
            cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, ctx + steps + 2),
                              num_hidden_layers=a.layers or cfg.num_hidden_layers)
        model = bench_model(cfg, device, dtype, ctx, steps, repeats, checks, log)
    meta = {"command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), REPO)]
                                             + (argv if argv is not None else sys.argv[1:])),
            "device": torch.cuda.get_device_name() if not a.smoke else "CPU (smoke)",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "seconds": round(time.time() - t_start, 1), "block": shape, "tiles": a.tiles,
            "model": "tiny" if a.smoke else a.model + (f" ({a.layers} layers)" if a.layers else ""),
            "int8_config": os.environ["FASTATTN_INT8_CONFIG"]}
    md = markdown(meta, blocks, model, checks)
    with open(os.path.join(a.out, "bench_int8_block_model.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out, "bench_int8_block_model.json"), "w") as f:
        json.dump({"meta": meta, "block": blocks, "model": model,
                   "checks": [{"name": n, "value": v, "bound": b, "ok": v <= b} for n, v, b in checks]}, f, indent=1)
    failed = [n for n, v, b in checks if not v <= b]
    print(md)
    print(f"SELF-CHECK: {'PASS' if not failed else 'FAIL: ' + '; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
