"""The summary of scripts/long_context_session.sh: its JSON files read back into the issue's table and targets.

    python scripts/long_context_summary.py OUTDIR

Reads what is there (a step that failed or was skipped leaves a row saying so): host_decode.json, ctx64k/, max/,
b24_8b/, b24_7b/ (bench-model --out folders) and trace_offload_prefill_*.json. Prints markdown.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import List, Optional


def load(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def bench(out: str, step: str) -> Optional[dict]:
    files = sorted(glob.glob(os.path.join(out, step, "bench_context_*.json")))
    return load(files[0]) if files else None


def host_lines(host: Optional[dict]) -> List[str]:
    if host is None:
        return ["- host bandwidth / CPU kernel: no host_decode.json (step failed or skipped)"]
    bw = host["bandwidth_gbps"]
    lines = [f"- host-memory read bandwidth (torch x.sum, {host['machine']['threads']} threads): **{bw:.1f} GB/s**; "
             f"CPU decode kernel: {host['machine']['compiled_kernel']}"]
    for r in host["results"]:
        if r["impl"] == "compiled":
            lines.append(f"  - {r['model']} batch {r['batch']}, {r['keys']} keys, {r['layout']}: {r['gbps']:.1f} GB/s "
                         f"= {r['ratio']:.2f} of the bandwidth (target 0.70)")
    return lines


def run_row(label: str, run: dict, off: Optional[dict], bw: Optional[float]) -> str:
    if "error" in run:
        return f"| {label} | {run['context']} | {run['kv_offload']} | refused: {run['error'][:160]} | | | | | |"
    ratio = f" ({run['prefill_tokens_per_s'] / off['prefill_tokens_per_s']:.2f}x of off)" if off else ""
    host = "-"
    if run.get("decode_host"):
        rate = run.get("decode_host_read_gbps", 0.0)
        host = f"{run['decode_host']} {run['decode_cpu_share']:.0%} CPU; {rate:.1f} GB/s"
        if bw:
            host += f" = {rate / bw:.2f} of x.sum (target 0.80)"
    shares = run.get("decode_share_measured") or {}
    names = {"cpu_attention": "CPU", "host_to_device_copies": "copies", "device_tier_attention": "device"}
    busy = ", ".join(f"{names.get(k, k)} {v:.0%}" for k, v in shares.items()) or "-"
    return (f"| {label} | {run['context']} | {run['kv_offload']} | {run['prefill_tokens_per_s']:.0f}{ratio} | "
            f"{run['decode_tokens_per_s']:.2f} | {run['kv_device_gib']:.1f} / {run['kv_host_gib']:.1f} | "
            f"{run.get('prefill_chunk', '-')} | {host} | {busy} |")


def bench_lines(out: str, bw: Optional[float]) -> List[str]:
    lines = ["| step | context | kv offload | prefill tokens/s | decode tokens/s | KV GiB device / host | prefill "
             "chunk | decode host tier: split, read rate | tier busy share of decode |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for step in ("ctx64k", "max", "b24_8b", "b24_7b"):
        r = bench(out, step)
        if r is None:
            lines.append(f"| {step} | no result (step failed or skipped) | | | | | | | |")
            continue
        label = step + (f" ({r['model']}, GPU budget {r['gpu_budget_gb']:g} GB)" if r.get("gpu_budget_gb") else
                        f" ({r['model']})")
        for run in r["runs"]:
            off = next((o for o in r["runs"] if o["kv_offload"] == "off" and o["context"] == run["context"]
                        and "error" not in o and o is not run), None)
            lines.append(run_row(label, run, off, bw))
            cap = run.get("context_max")
            if cap:
                notes.append(f"- --context max ({r['model']}): {cap['cache_tokens']} tokens = {cap['share_of_bound']:.1%} "
                             f"of the bound {cap['bound_tokens']} (target 95%); longest on the device alone: "
                             f"{r.get('longest_without_offload')}")
            if run.get("rates") and run.get("decode_host"):
                rt = run["rates"]
                notes.append(f"- rates the plan measured ({step}): host->device {rt['pcie_gbps']:.1f} GB/s alone, "
                             f"{rt['pcie_both_gbps']:.1f} beside the CPU; CPU attention {rt['cpu_gbps']:.1f} alone, "
                             f"{rt['cpu_both_gbps']:.1f} beside copies ({rt['threads']} threads)")
    return lines + [""] + sorted(set(notes), key=notes.index)


def trace_lines(out: str) -> List[str]:
    files = glob.glob(os.path.join(out, "trace_offload_prefill_*.json"))
    t = load(files[0]) if files else None
    if t is None:
        return ["- prefill trace: none (step failed or skipped)"]
    lines = [f"- prefill trace, {t['layers']} layers of {t['model']} at {t['context']} tokens:"]
    for r in t["runs"]:
        busy = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["busy_s"].items()))
        lines.append(f"  - {r['kv_offload']} (chunk {r['prefill_chunk']}): wall {r['wall_s']:.3f} s, device idle "
                     f"{r['device_idle_s']:.3f} s; busy s: {busy}")
    return lines


def main(argv=None) -> int:
    out = (argv or sys.argv[1:] or ["."])[0]
    host = load(os.path.join(out, "host_decode.json"))
    bw = host["bandwidth_gbps"] if host else None
    print("\n".join(["## Long context: what this session measured", ""] + host_lines(host) + [""]
                    + bench_lines(out, bw) + trace_lines(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
