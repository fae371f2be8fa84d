"""Where an offloaded prefill's time goes: a GPU kernel trace of the one-tier and the two-tier prefill, side by side.

A slice of a model shape (default: 4 layers of Llama-2-7B, random bf16 weights) prefills ``--context`` tokens into a
one-tier cache and into a cache with ``--gpu-tokens`` on the device and the rest in pinned host memory, each once
untimed and once under torch.profiler. Every kernel and copy is put in a category by its name (attention, GEMM,
LSE merges, host-to-device and device-to-host copies, other elementwise work); per run the script prints the wall
time, each category's busy time, and the device's idle time (wall minus the union of compute kernels), so the
offloaded run's extra time is attributed: to streaming the host tier (exposed copies), to merges, or to idling.

    python scripts/trace_offload_prefill.py --model 7b-mha --layers 4 --context 65536 --gpu-tokens 32768 --out OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastattn_dist.models.bench_model import BenchModelOptions, build_model, random_ids  # noqa: E402
from fastattn_dist.profiler.metrics import length, union  # noqa: E402

CATEGORIES = (  # first match wins
    ("h2d", ("memcpy htod",)),
    ("d2h", ("memcpy dtoh",)),
    ("merge", ("merge",)),
    ("attention", ("fmha", "cudnn", "attn", "flash", "sdpa", "attention", "_fwd")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90", "sm80")),
    ("copy", ("copy", "transpose", "cat")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def trace(model, ids, offload, chunk):
    from torch.profiler import ProfilerActivity, profile  # optional: this script only

    model.drop_cache()
    model.kv_plan, model.kv_offload, model.prefill_chunk = None, offload, chunk
    model.reset_cache(1, ids.shape[1] + 1)
    model.prefill(ids)  # untimed: kernels built, plans made
    model.reset_cache(1, ids.shape[1] + 1)  # the same cache, emptied
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        model.prefill(ids)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    evs = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA"]
    busy = {}
    for name, a, b in evs:
        busy[category(name)] = busy.get(category(name), 0.0) + (b - a) / 1e6
    compute = union([(a, b) for n, a, b in evs if category(n) not in ("h2d", "d2h")])
    span = (max(b for _, _, b in evs) - min(a for _, a, _ in evs)) / 1e6 if evs else 0.0
    plan = model.kv_plan
    res = {"kv_offload": offload, "wall_s": wall, "kernel_span_s": span, "busy_s": busy,
           "device_idle_s": span - length(compute) / 1e6, "plan": plan.describe() if plan else None,
           "prefill_chunk": chunk or (plan.prefill_chunk if plan else None)}
    model.drop_cache()
    torch.cuda.empty_cache()
    return res


def slice_arguments(doc: str, layers: int) -> argparse.ArgumentParser:
    """The options of both offload traces: a slice of a model shape, the context, its device tokens, --out."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--model", default="7b-mha", help="a preset shape (random weights)")
    p.add_argument("--layers", type=int, default=layers, help="the slice's layers")
    p.add_argument("--context", type=int, default=65536)
    p.add_argument("--gpu-tokens", type=int, default=32768, help="the cache's tokens on the device")
    p.add_argument("--out", required=True, help="folder for the JSON")
    return p


def main() -> None:
    p = slice_arguments(__doc__, layers=4)
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk of both runs (default: the plan's)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda")
    opts = BenchModelOptions(a.model, a.model, torch.bfloat16, seq=a.context, layers=a.layers, decode_tokens=1)
    model = build_model(opts, dev, max_seq_len=a.context + 1)
    ids = random_ids(model.config.vocab_size, 1, a.context, 0, dev)
    runs = []
    with torch.no_grad():
        offloaded = trace(model, ids, a.gpu_tokens, a.chunk)
        # the one-tier run in the offloaded run's chunks (what chunking alone costs), and whole
        runs = [trace(model, ids, "off", offloaded["prefill_chunk"]), trace(model, ids, "off", a.chunk), offloaded]
    for r in runs:
        busy = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["busy_s"].items()))
        print(f"{str(r['kv_offload']):>6} chunk {r['prefill_chunk']}: wall {r['wall_s']:.3f} s, kernels span "
              f"{r['kernel_span_s']:.3f} s, device idle {r['device_idle_s']:.3f} s; busy s: {busy}", flush=True)
    base = runs[1]["wall_s"]
    print(f"offloaded / one tier: {base / runs[2]['wall_s']:.2f}x of the one-tier prefill rate "
          f"({runs[1]['wall_s'] / runs[0]['wall_s']:.2f}x from chunking alone)")
    with open(os.path.join(a.out, f"trace_offload_prefill_{a.model}.json"), "w") as f:
        json.dump({"model": a.model, "layers": a.layers, "context": a.context, "gpu_tokens": a.gpu_tokens,
                   "device": torch.cuda.get_device_name(), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
