"""Host-tier decode attention on the CPU against this machine's memory read bandwidth.

Measures, at one thread count (default: torch's, i.e. all cores):
  (i)   host-memory read bandwidth: torch ``x.sum()`` over a float32 tensor of ``--gib`` GiB (default 4),
        the median of several runs;
  (ii)  each implementation of ``host_decode_attention`` (``compiled``, ``torch``), both cache layouts,
        one layer of a host tier in bf16: Llama-2-7B (32 kv heads x 128, 32 query heads) and Llama-3-8B
        (8 kv heads x 128, 32 query heads), 8K / 32K / 128K keys, batch 1 and 4; GB/s of K/V read and the
        ratio to (i);
  (iii) the old path, generic tiled flash attention (``tiled_attention``, what decode used before this kernel),
        on the layout it takes.
Each case also reports the largest difference between the compiled and the torch result (relative to the
largest output), a check that the kernel built for this CPU computes what the fallback does.

Prints a markdown table; ``--out`` writes everything as JSON. No GPU needed.

    python scripts/bench_host_decode.py --out host_decode.json                  # all cores, full sizes
    python scripts/bench_host_decode.py --gib 1 --contexts 4096 16384 --out x.json   # a small machine
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastattn_dist.attention import host_decode as hd  # noqa: E402

MODELS = {  # name: (kv heads, query heads, head_dim)
    "llama2-7b": (32, 32, 128),
    "llama3-8b": (8, 32, 128),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, min_runs: int, max_runs: int, budget_s: float):
    """Median seconds of fn() after one warm-up call: at least min_runs, at most max_runs, fewer past budget_s;
    a warm-up call longer than budget_s is the only sample (the old path takes seconds at large shapes)."""
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    if first > budget_s:
        return first, [first], result
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def read_bandwidth(gib: float, runs: int):
    x = torch.empty(int(gib * (1 << 30)) // 4, dtype=torch.float32).uniform_()
    med, times, _ = timed(lambda: x.sum(), runs, runs, 1e9)
    nbytes = x.numel() * 4
    del x
    return nbytes / med / 1e9, [nbytes / t / 1e9 for t in times]


def old_host_attention():
    """The old host-tier decode path as a callable (q, k, v, lengths): tiled flash attention, 4096-key blocks."""
    from fastattn_dist.attention.tiled import tiled_attention
    from fastattn_dist.masks import Mask

    return lambda q, k, v, kl: tiled_attention(q, k, v, Mask(False, None, kl), return_lse=True, block_q=128,
                                               block_k=4096)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, all cores)")
    ap.add_argument("--gib", type=float, default=4.0, help="size of the bandwidth probe, GiB (default 4)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072], help="keys in the host tier")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--layouts", nargs="+", default=list(hd.LAYOUTS), choices=list(hd.LAYOUTS))
    ap.add_argument("--impls", nargs="+", default=["compiled", "torch", "old"], choices=["compiled", "torch", "old"])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per case (fewer for slow cases, see --budget)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per case after 3 runs (default 2)")
    ap.add_argument("--old-max-gib", type=float, default=2.0,
                    help="run the old path only where K/V is at most this many GiB (it is 10-100x slower)")
    ap.add_argument("--max-seconds", type=float, default=165.0,
                    help="skip the torch and old paths, then whole cases, past this many seconds (default 165)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    mod = hd.compiled_kernel() if "compiled" in args.impls else None
    build_s = time.perf_counter() - t0
    why = hd.compiled_unavailable() if "compiled" in args.impls else "not asked for"
    machine = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
               "compiled_kernel": "unavailable: " + why if why else
               f"built/loaded in {build_s:.1f} s, vectors of {mod.head_dim_multiple() // 2} floats"}
    print(f"# Host decode attention, {datetime.date.today()}: {machine['cpu']}, {threads} threads, torch "
          f"{torch.__version__}; compiled kernel: {machine['compiled_kernel']}")

    bw, bw_runs = read_bandwidth(args.gib, args.runs)
    print(f"\nhost-memory read bandwidth: x.sum() over {args.gib:g} GiB float32, {threads} threads: **{bw:.1f} GB/s** "
          f"(median of {len(bw_runs)}: {', '.join(f'{r:.1f}' for r in bw_runs)})\n")

    old = old_host_attention() if "old" in args.impls else None
    results, skipped = [], []
    print("| model | batch | keys | layout | impl | ms | GB/s of K/V | x bandwidth | vs torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        hkv, hq, d = MODELS[model]
        for batch in args.batches:
            for keys in args.contexts:
                q = torch.empty(batch, 1, hq, d).uniform_(-1, 1).to(torch.bfloat16)
                lengths = torch.full((batch,), keys, dtype=torch.int64)
                for layout in args.layouts:
                    if time.perf_counter() - t_start > args.max_seconds:
                        skipped.append(f"{model} batch {batch} {keys} keys {layout}")
                        continue
                    shape = (batch, keys, hkv, d) if layout == "bthd" else (batch, hkv, keys, d)
                    k = torch.empty(shape, dtype=torch.bfloat16).uniform_(-1, 1)
                    v = torch.empty(shape, dtype=torch.bfloat16).uniform_(-1, 1)
                    nbytes = 2 * k.numel() * k.element_size()
                    outs = {}
                    for impl in args.impls:
                        row = {"model": model, "kv_heads": hkv, "q_heads": hq, "head_dim": d, "batch": batch,
                               "keys": keys, "layout": layout, "impl": impl, "kv_bytes": nbytes}
                        if impl == "compiled" and mod is None:
                            continue
                        too_big = nbytes > args.old_max_gib * (1 << 30)
                        if impl == "old" and (old is None or layout != "bthd" or too_big):
                            continue  # the old path takes the cache's current [B, T, H, D] only
                        if impl != "compiled" and time.perf_counter() - t_start > 0.8 * args.max_seconds:
                            skipped.append(f"{model} batch {batch} {keys} keys {layout} {impl}")
                            continue
                        if impl == "old":
                            fn = lambda: old(q, k, v, lengths)  # noqa: E731
                        else:
                            fn = lambda: hd.host_decode_attention(q, k, v, lengths, layout=layout,  # noqa: E731
                                                                  threads=threads, impl=impl)
                        med, times, (out, _) = timed(fn, min(3, args.runs), args.runs, args.budget)
                        outs[impl] = out.float()
                        row.update(seconds=med, seconds_all=times, gbps=nbytes / med / 1e9)
                        row["ratio"] = row["gbps"] / bw
                        results.append(row)
                    for row in results[len(results) - len(outs):]:
                        if "torch" in outs and row["impl"] != "torch":
                            ref = outs["torch"]
                            row["max_rel_diff_vs_torch"] = ((outs[row["impl"]] - ref).abs().max()
                                                            / ref.abs().max()).item()
                        diff = row.get("max_rel_diff_vs_torch")
                        print(f"| {model} | {batch} | {keys} | {layout} | {row['impl']} | {row['seconds'] * 1e3:.2f} | "
                              f"{row['gbps']:.1f} | {row['ratio']:.2f} | "
                              + (f"{diff:.1e}" if diff is not None else "") + " |", flush=True)
                    del k, v, outs
    total = time.perf_counter() - t_start
    if skipped:
        print(f"\nskipped past the time budget (--max-seconds {args.max_seconds:g}): " + "; ".join(skipped))
    print(f"\n(x bandwidth: GB/s of K/V over the x.sum() bandwidth above; vs torch: max |out - torch out| / "
          f"max |torch out|; old: bthd only, K/V <= {args.old_max_gib:g} GiB; {total:.0f} s in all)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": str(datetime.date.today()), "machine": machine, "bandwidth_gbps": bw,
                       "bandwidth_runs_gbps": bw_runs, "bandwidth_gib": args.gib, "results": results,
                       "skipped": skipped, "seconds": total}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
