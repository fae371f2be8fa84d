"""Exploration on one GPU: where the tile tax comes from and which execution removes it.

One rank's shape of a TP=N group (local heads = heads / N, d = 128, bf16, causal), CUDA-graph
replay of every variant, medians of --repeats replays, outputs checked against the baseline. Writes
a JSON of every number to --out and prints a table per shape. Variants:

  base          SDPA (default backend) + o_proj GEMM, one stream                 (the baseline)
  t1_copy       cuDNN call -> copy into the o_proj buffer -> GEMM                  (the block before)
  t1_direct     cuDNN call -> GEMM straight on cuDNN's output (no copy)
  t1_triton     our Triton kernel over all rows -> GEMM                           (upper bound of a
                                                                                   one-launch design)
  s{1,2,3}_split_t{n}  n tiles, cuDNN prefix + diagonal + LSE merge per tile, tiles spread over 1-3
                compute streams (tile i on stream i % k), GEMM of a tile on its stream
  s2_par_t{n}   as s2_split, the prefix call on a helper stream beside the diagonal call
  s2_triton_t{n}  2 streams, our Triton kernel per tile (no merge)
  ...+sa        with the comm stand-in after every tile's GEMM (high-priority comm stream)
  seq+sa        the baseline followed by one stand-in all-reduce of the whole output

Also: cuDNN's causal alignment for s_q < s_kv; the stand-in's achieved vs requested time; attention
slowed by a concurrent stand-in holding k CTAs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastattn_dist.attention.cudnn_split import cudnn_attend, merge  # noqa: E402
from fastattn_dist.attention.triton_fa import triton_attention  # noqa: E402
from fastattn_dist.masks import Causal  # noqa: E402
from fastattn_dist.parallel.emulated_comm import StandInAllReduce
from fastattn_dist.parallel.link_models import GpuLinkModel  # noqa: E402
from fastattn_dist.parallel.tile_plan import cost_balanced_plan  # noqa: E402

D = 128
DT = torch.bfloat16


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def timed_graph(fn, repeats):
    """Capture fn (which may fork to other streams and joins back) as a CUDA graph; median replay ms."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), g


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


class Shape:
    def __init__(self, tp, hidden, heads, seq, batch):
        self.tp, self.hidden, self.heads, self.seq, self.batch = tp, hidden, heads, seq, batch
        self.hl = heads // tp
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(DT)
        self.q, self.k, self.v = (mk(batch, seq, self.hl, D) for _ in range(3))
        self.wo = (torch.randn(hidden, self.hl * D, generator=g, device="cuda") * hidden ** -0.5).to(DT)
        self.buf = torch.empty(batch * seq, self.hl * D, device="cuda", dtype=DT)
        self.out = torch.empty(batch * seq, hidden, device="cuda", dtype=DT)

    @property
    def name(self):
        return f"TP{self.tp} h{self.hidden} B{self.batch} S{self.seq}"

    def row_cost(self):
        pos = torch.arange(self.seq, dtype=torch.float64)
        c = 4.0 * self.hl * D * (pos + 1) / 550e12 + 2.0 * self.hl * D * self.hidden / 700e12
        return c.repeat(self.batch)


def plan_bounds(shape, n, share=0.5):
    return cost_balanced_plan(shape.row_cost(), n, share).bounds


def segments(r0, r1, S):
    r = r0
    while r < r1:
        b, s = divmod(r, S)
        e = min(r1, (b + 1) * S)
        yield b, s, e - b * S, r, e
        r = e


class Runner:
    """Issues one variant's work: tiles over compute streams, optional stand-in after each tile."""

    def __init__(self, shape, streams, helper, comm):
        self.sh, self.streams, self.helper, self.comm = shape, streams, helper, comm

    def attend_tile(self, how, r0, r1, stream):
        sh = self.sh
        S = sh.seq
        for b, s0, s1, f0, f1 in segments(r0, r1, S):
            q = sh.q[b:b + 1, s0:s1]
            dst = sh.buf[f0:f1].view(1, s1 - s0, sh.hl, D)
            k, v = sh.k[b:b + 1], sh.v[b:b + 1]
            if how == "triton":
                triton_attention(q, k, v, Causal(), q_offset=s0, out=dst)
                continue
            scale = D ** -0.5
            o_d, lse_d = cudnn_attend(q, k[:, s0:s1], v[:, s0:s1], True, scale, s0 > 0)
            if s0 == 0:
                dst.copy_(o_d)
                continue
            if how == "par":
                self.helper.wait_stream(stream)
                with torch.cuda.stream(self.helper):
                    o_p, lse_p = cudnn_attend(q, k[:, :s0], v[:, :s0], False, scale, True)
                stream.wait_stream(self.helper)
                for t in (o_p, lse_p):
                    t.record_stream(stream)
            else:
                o_p, lse_p = cudnn_attend(q, k[:, :s0], v[:, :s0], False, scale, True)
            merge(dst, o_p, lse_p, o_d, lse_d)

    def run(self, how, bounds):
        sh = self.sh
        main = torch.cuda.current_stream()
        for st in self.streams:
            st.wait_stream(main)
        handles = []
        for i in range(len(bounds) - 1):
            r0, r1 = bounds[i], bounds[i + 1]
            st = self.streams[i % len(self.streams)]
            with torch.cuda.stream(st):
                self.attend_tile(how, r0, r1, st)
                torch.matmul(sh.buf[r0:r1], sh.wo.t(), out=sh.out[r0:r1])
                if self.comm is not None:
                    handles.append(self.comm.start(sh.out[r0:r1], i))
        for st in self.streams:
            main.wait_stream(st)
        if self.comm is not None:
            self.comm.wait_all(handles)


def explore_shape(sh, tiles, repeats, models, results, with_triton):
    res = {"shape": sh.name, "tp": sh.tp, "hidden": sh.hidden, "heads": sh.heads, "seq": sh.seq,
           "batch": sh.batch, "runs": {}}
    rows = sh.batch * sh.seq
    main_streams = [torch.cuda.Stream() for _ in range(3)]
    helper = torch.cuda.Stream()

    def base():
        a = sdpa(sh.q, sh.k, sh.v).reshape(rows, sh.hl * D)
        torch.matmul(a, sh.wo.t(), out=sh.out)

    def t1_copy():
        o, _ = cudnn_attend(sh.q, sh.k, sh.v, True, D ** -0.5, False)
        sh.buf.view(sh.batch, sh.seq, sh.hl, D).copy_(o)
        torch.matmul(sh.buf, sh.wo.t(), out=sh.out)

    def t1_direct():
        o, _ = cudnn_attend(sh.q, sh.k, sh.v, True, D ** -0.5, False)
        torch.matmul(o.reshape(rows, sh.hl * D), sh.wo.t(), out=sh.out)

    def t1_triton():
        triton_attention(sh.q, sh.k, sh.v, Causal(), out=sh.buf.view(sh.batch, sh.seq, sh.hl, D))
        torch.matmul(sh.buf, sh.wo.t(), out=sh.out)

    ref = None

    def measure(name, fn):
        nonlocal ref
        try:
            sh.out.fill_(float("nan"))
            ms, _ = timed_graph(fn, repeats)
            y = sh.out.float()
            if ref is None:
                ref = y.clone()
            err = ((y - ref).norm() / ref.norm()).item()
            res["runs"][name] = {"ms": ms, "rel_err_vs_base": err}
        except Exception as e:  # one variant failing must not hide the others
            res["runs"][name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        torch.cuda.synchronize()

    measure("base", base)
    measure("t1_copy", t1_copy)
    measure("t1_direct", t1_direct)
    if with_triton:
        measure("t1_triton", t1_triton)
    variants = [("s1_split", 1, "split"), ("s2_split", 2, "split"), ("s3_split", 3, "split"), ("s2_par", 2, "par")]
    if with_triton:
        variants.append(("s2_triton", 2, "triton"))
    plans = {}
    for n in tiles:
        plans[n] = plan_bounds(sh, n)
    res["plans"] = {str(n): list(b) for n, b in plans.items()}
    for n in tiles:
        for vname, k, how in variants:
            r = Runner(sh, main_streams[:k], helper, None)
            measure(f"{vname}_t{n}", lambda r=r, how=how, b=plans[n]: r.run(how, b))
    # equal-cost plan with a full last tile, 2 streams
    for n in tiles:
        b = plan_bounds(sh, n, 1.0)
        r = Runner(sh, main_streams[:2], helper, None)
        measure(f"s2_split_eq_t{n}", lambda r=r, b=b: r.run("split", b))
    # with the stand-in
    for mname, model in models.items():
        comm = StandInAllReduce(sh.tp, model)

        def seq_sa(comm=comm):
            base()
            comm.issue(sh.out)

        measure(f"seq+{mname}", seq_sa)
        r1 = Runner(sh, main_streams[:1], helper, comm)
        measure(f"t1+{mname}", lambda r=r1: r.run("split", (0, rows)))
        for n in tiles:
            for vname, k, how in (("s1_split", 1, "split"), ("s2_split", 2, "split")):
                r = Runner(sh, main_streams[:k], helper, comm)
                measure(f"{vname}_t{n}+{mname}", lambda r=r, how=how, b=plans[n]: r.run(how, b))
    results.append(res)
    return res


def standin_accuracy(models):
    """Requested vs achieved stand-in time for a few message sizes (alone on the GPU)."""
    out = []
    for mname, model in models.items():
        for tp in (2, 4):
            comm = StandInAllReduce(tp, model)
            for mb in (1, 8, 32, 128):
                x = torch.randn(mb * (1 << 20) // 2, device="cuda").to(DT)
                ms, _ = timed_graph(lambda: comm.issue(x), 20)
                want = model.allreduce_seconds(x.numel() * 2, tp) * 1e3
                out.append({"model": mname, "tp": tp, "mb": mb, "want_ms": want, "got_ms": ms})
    return out


def interference(repeats):
    """Whole-sequence SDPA time while a stand-in holding k CTAs runs for much longer beside it."""
    q = torch.randn(1, 8192, 16, D, device="cuda", dtype=DT)
    out = []
    x = torch.randn(1 << 20, device="cuda", dtype=DT)
    for ctas in (0, 1, 4, 8, 16, 24, 32):
        side = torch.cuda.Stream(priority=-1)
        if ctas:
            model = GpuLinkModel(latency_us=20000.0, bus_gbps=300.0, ctas=ctas, full_bw_ctas=ctas)
            comm = StandInAllReduce(2, model)

        def fn():
            if ctas:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    comm.issue(x)
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            time.sleep(0.002)  # let the stand-in's CTAs become resident first
            a.record()
            for _ in range(5):
                sdpa(q, q, q)
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 5
        fn()
        ts = [fn() for _ in range(max(5, repeats // 4))]
        out.append({"ctas": ctas, "sdpa_ms": statistics.median(ts)})
    return out


def cudnn_alignment():
    """Does cuDNN's causal mask for s_q < s_kv align top-left or bottom-right (torch's op as installed)?"""
    q = torch.randn(1, 256, 2, D, device="cuda", dtype=DT)
    k = torch.randn(1, 1024, 2, D, device="cuda", dtype=DT)
    v = torch.randn(1, 1024, 2, D, device="cuda", dtype=DT)
    try:
        o, _ = cudnn_attend(q, k, v, True, D ** -0.5, False)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * D ** -0.5
    i = torch.arange(256, device="cuda")[:, None]
    j = torch.arange(1024, device="cuda")[None, :]
    res = {}
    for name, keep in (("top_left", j <= i), ("bottom_right", j <= i + 768)):
        r = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ vd
        res[name] = ((o.double().transpose(1, 2) - r).norm() / r.norm()).item()
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="explore_out")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-triton", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("FASTATTN_TRITON_CONFIG", "128,128,8,3,1")
    torch.backends.cuda.matmul.allow_tf32 = True
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    import triton
    info["triton"] = triton.__version__
    log(info)
    t_start = time.time()
    report = {"info": info}
    report["cudnn_alignment"] = cudnn_alignment()
    log("cudnn alignment", report["cudnn_alignment"])
    models = {"sa": None}  # default per-TP stand-in (filled per shape below)
    results = []
    grid = [(2, 4096, 32, 8192, 1), (4, 4096, 32, 8192, 1), (4, 8192, 64, 8192, 1), (8, 8192, 64, 8192, 1),
            (2, 4096, 32, 2048, 1), (4, 8192, 64, 2048, 1), (4, 8192, 64, 2048, 4),
            (4, 8192, 64, 32768, 1), (2, 4096, 32, 32768, 1)]
    if args.quick:
        grid = grid[:2]
    for tp, hidden, heads, seq, batch in grid:
        if time.time() - t_start > 420:
            log("time budget reached; stopping the grid")
            break
        sh = Shape(tp, hidden, heads, seq, batch)
        t0 = time.time()
        models = {"sa": GpuLinkModel.for_world_size(tp),
                  "sa_ce": GpuLinkModel.for_world_size(tp, path="copy_engine")}
        r = explore_shape(sh, (2, 3, 4), args.repeats, models, results, not args.no_triton and seq <= 8192)
        base = r["runs"]["base"].get("ms", float("nan"))
        line = " ".join(f"{k}={v['ms'] / base:.3f}" if "ms" in v else f"{k}=ERR" for k, v in r["runs"].items())
        log(f"[{time.time() - t0:.0f}s] {sh.name} base {base:.3f} ms | {line}")
        with open(os.path.join(args.out, "explore.json"), "w") as f:
            json.dump({**report, "results": results}, f, indent=1)
        del sh
        torch.cuda.empty_cache()
    report["standin_accuracy"] = standin_accuracy({"default": GpuLinkModel.for_world_size(2)})
    report["interference"] = interference(args.repeats)
    report["results"] = results
    with open(os.path.join(args.out, "explore.json"), "w") as f:
        json.dump(report, f, indent=1)
    # summary table
    print(json.dumps(report["cudnn_alignment"]))
    for a in report["standin_accuracy"]:
        print(f"standin tp{a['tp']} {a['mb']}MB want {a['want_ms']:.3f} got {a['got_ms']:.3f}")
    for a in report["interference"]:
        print(f"interference ctas {a['ctas']}: sdpa {a['sdpa_ms']:.3f} ms")
    for r in results:
        base = r["runs"]["base"].get("ms", float("nan"))
        print(f"== {r['shape']}: base {base:.3f} ms")
        for k, v in r["runs"].items():
            print(f"   {k:22s} " + (f"{v['ms']:.3f} ms  x{v['ms'] / base:.3f}  err {v['rel_err_vs_base']:.1e}"
                                     if "ms" in v else v["error"][:150]))


if __name__ == "__main__":
    main()
