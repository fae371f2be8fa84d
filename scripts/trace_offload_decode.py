"""Where an offloaded decode step's time goes, layer by layer: the CPU part, the host->device copies, the device
tier's attention and the streamed part on one timeline, for several CPU thread counts and CPU shares.

A slice of a model shape (default: 8 layers of Llama-2-7B, random bf16 weights) prefills ``--context`` tokens into
a cache with ``--gpu-tokens`` on the device and the rest in pinned host memory, then decodes ``--steps`` tokens per
variant. Per variant it prints decode tokens/s, the host tier's read rate (host K/V bytes per step / step time) and,
for the last step, per-layer means of: the CPU part's time, the copies' time, the device tier's and the streamed
part's device time, and the gap between one layer's CPU part ending and the next one's starting (the serial chain:
merge, o_proj, MLP, the next q/k/v and the query's trip to the host). The GPU and the host clocks are aligned at
the step's start (a synchronize, then an event), within tens of microseconds.

    python scripts/trace_offload_decode.py --context 65536 --gpu-tokens 32768 --threads 16 15 12 --out OUT
    python scripts/trace_offload_decode.py --strategies plain fused --profile --out OUT   (the fused loop's gain)
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastattn_dist.models import host_stream, kv_offload  # noqa: E402
from fastattn_dist.models.decode import FusedTieredDecode, TieredDecode  # noqa: E402
from fastattn_dist.models.bench_model import BenchModelOptions, build_model, random_ids  # noqa: E402
from fastattn_dist.models.presets import resolve_model  # noqa: E402
from trace_offload_prefill import slice_arguments  # noqa: E402  (this folder is on the path of a script)


class Timeline:
    """Host times (perf_counter) and CUDA events of one decode step, tagged by layer."""

    def __init__(self) -> None:
        self.on = False
        self.base = None
        self.t0 = 0.0
        self.host = []     # (what, layer, t_start, t_end) host seconds since t0
        self.gpu = []      # (what, layer, start event, end event)

    def start(self, cuda: bool) -> None:
        self.cuda = cuda
        sync()
        self.host.clear()
        self.gpu.clear()
        if cuda:
            self.base = torch.cuda.Event(enable_timing=True)
            self.base.record()
        self.t0 = time.perf_counter()
        self.on = True

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def gpu_range(self, what, layer, fn):
        if not self.on:
            return fn()
        if not self.cuda:  # a CPU run (the script's own smoke test): host times
            t0 = self.now()
            res = fn()
            self.host.append((what, layer, t0, self.now()))
            return res
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        res = fn()
        b.record()
        self.gpu.append((what, layer, a, b))
        return res

    def rows(self):
        sync()
        out = [(w, li, s, e) for w, li, s, e in self.host]
        for w, li, a, b in self.gpu:
            out.append((w, li, self.base.elapsed_time(a) / 1e3, self.base.elapsed_time(b) / 1e3))
        return sorted(out, key=lambda r: r[2])


TL = Timeline()
STRATEGIES = {"plain": TieredDecode, "fused": FusedTieredDecode}   # --strategies


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def install_hooks() -> None:
    """Wrap the decode path's parts so they report to TL (the product code stays as it is)."""
    cpu_part, device_part, streamed = kv_offload._cpu_part, kv_offload._device_part, kv_offload._streamed_parts
    tiered = kv_offload.tiered_decode_attention
    issue = host_stream.HostStream._issue

    def _cpu_part(cache, layer, q_host, ready, split):
        t0 = TL.now()
        if ready is not None:
            ready.synchronize()
        t1 = TL.now()
        res = cpu_part(cache, layer, q_host, None, split)
        if TL.on:
            TL.host.append(("cpu_wait_q", layer, t0, t1))
            TL.host.append(("cpu", layer, t1, TL.now()))
        return res

    def _device_part(cache, layer, q, split, backend):
        return TL.gpu_range("device_tier", layer, lambda: device_part(cache, layer, q, split, backend))

    def _streamed_parts(cache, layer, q, split, backend):
        return TL.gpu_range("streamed", layer, lambda: streamed(cache, layer, q, split, backend))

    def tiered_decode_attention(cache, layer, q, k_new, v_new, split, backend="auto"):
        t0 = TL.now()
        res = tiered(cache, layer, q, k_new, v_new, split, backend)
        if TL.on:
            TL.host.append(("main_attention_call", layer, t0, TL.now()))
        return res

    def _issue(self, unit, slot):
        if not TL.on:
            return issue(self, unit, slot)
        if self.fetch_stream is None:  # a CPU run: the copy is synchronous
            t0 = TL.now()
            issue(self, unit, slot)
            TL.host.append(("copy", unit[0], t0, TL.now()))
            return
        t = self.timing
        self.timing = True
        issue(self, unit, slot)
        self.timing = t
        a, b = self.copy_events.pop()
        TL.gpu.append(("copy", unit[0], a, b))
        TL.host.append(("copy_issued", unit[0], TL.now(), TL.now()))

    kv_offload._cpu_part, kv_offload._device_part, kv_offload._streamed_parts = _cpu_part, _device_part, _streamed_parts
    kv_offload.tiered_decode_attention = tiered_decode_attention
    from fastattn_dist.models import decode as decode_mod
    decode_mod.tiered_decode_attention = tiered_decode_attention
    host_stream.HostStream._issue = _issue


def per_layer(rows, layers):
    """Means over layers of each part's time, and the CPU-to-CPU gap."""
    by = {}
    for w, li, s, e in rows:
        by.setdefault(w, {}).setdefault(li, 0.0)
        by[w][li] += e - s
    res = {w: sum(v.values()) / layers for w, v in by.items()}
    cpu = sorted((li, s, e) for w, li, s, e in rows if w == "cpu")
    gaps = [cpu[i + 1][1] - cpu[i][2] for i in range(len(cpu) - 1)]
    res["cpu_to_next_cpu_gap"] = sum(gaps) / len(gaps) if gaps else 0.0
    return {k: round(v * 1e3, 3) for k, v in res.items()}   # milliseconds


def run_variant(model, steps: int, threads: int, share, log, strategy: str = "") -> dict:
    c = model.cache
    if strategy:
        model._decode = STRATEGIES[strategy](model)
    c.cpu_threads = threads
    plan = model.kv_plan
    share0 = plan.decode_cpu_share
    if share is not None:
        plan.decode_cpu_share = share
    tok = torch.zeros(1, dtype=torch.long, device=model.device)
    model.decode_step(tok)           # untimed: the split and its kernels
    sync()
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        model.decode_step(tok)
    sync()
    step_s = (time.perf_counter() - t0) / max(1, steps - 1)
    TL.start(model.device.type == "cuda")
    model.decode_step(tok)
    sync()
    traced_s = TL.now()
    TL.on = False
    rows = TL.rows()
    plan.decode_cpu_share = share0
    host_keys = sum(max(0, n - c.gpu_tokens) for n in c.host_lengths)   # host_lengths: each sequence's whole length
    host_bytes = host_keys * model.kv_bytes_per_token()
    res = {"strategy": type(model._decode).__name__, "threads": threads,
           "cpu_share": share if share is not None else share0, "step_ms": step_s * 1e3,
           "traced_step_ms": traced_s * 1e3, "tokens_per_s": 1 / step_s,
           "host_read_gbps": host_bytes / step_s / 1e9, "per_layer_ms": per_layer(rows, model.config.num_hidden_layers),
           "timeline": [(w, li, round(s * 1e3, 3), round(e * 1e3, 3)) for w, li, s, e in rows]}
    log(f"{res['strategy']}: threads {threads:2d} share {res['cpu_share']:.2f}: {res['tokens_per_s']:.2f} tok/s, "
        f"host read {res['host_read_gbps']:.1f} GB/s; per layer ms {res['per_layer_ms']}")
    return res


def profile_step(model, out: str, log) -> None:
    """The calling thread's operators in one decode step, by their own CPU time (torch.profiler), to a file."""
    from torch.profiler import ProfilerActivity, profile  # optional: this script only

    tok = torch.zeros(1, dtype=torch.long, device=model.device)
    sync()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.decode_step(tok)
        sync()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    with open(out, "w") as f:
        f.write(table)
    log(table)


def main() -> None:
    p = slice_arguments(__doc__, layers=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--shares", type=float, nargs="*", default=[], help="CPU shares to try beside the plan's")
    p.add_argument("--strategies", nargs="*", default=[], choices=sorted(STRATEGIES),
                   help="decode strategies to compare first, at the plan's share (default: the model's own)")
    p.add_argument("--profile", action="store_true", help="also the calling thread's operators in one step")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    opts = BenchModelOptions(resolve_model(a.model), a.model, dtype, seq=a.context, layers=a.layers,
                             decode_tokens=a.steps)
    n = a.context + (a.steps + 1) * (len(a.threads) + len(a.shares) + len(a.strategies)) + 8
    model = build_model(opts, dev, max_seq_len=n)
    ids = random_ids(model.config.vocab_size, 1, a.context, 0, dev)
    install_hooks()

    def log(s):
        print(s, flush=True)
    with torch.no_grad():
        model.kv_offload = a.gpu_tokens
        model.reset_cache(1, n)
        log(model.kv_plan.describe())
        model.prefill(ids)
        own = model._decode
        runs = [run_variant(model, a.steps, a.threads[0], None, log, name) for name in a.strategies]
        model._decode = own  # the thread and share variants: the model's own strategy
        runs += [run_variant(model, a.steps, t, None, log) for t in a.threads]
        runs += [run_variant(model, a.steps, a.threads[0], s, log) for s in a.shares]
        if a.profile:
            profile_step(model, os.path.join(a.out, f"profile_offload_decode_{a.model}.txt"), log)
    with open(os.path.join(a.out, f"trace_offload_decode_{a.model}.json"), "w") as f:
        json.dump({"model": a.model, "layers": a.layers, "context": a.context, "gpu_tokens": a.gpu_tokens,
                   "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "cores": os.cpu_count(),
                   "plan": model.kv_plan.describe(), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
