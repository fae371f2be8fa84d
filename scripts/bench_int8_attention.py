"""8-bit attention on one H100/H200: cuDNN bf16, our bf16 Triton kernel, the int8 / int8-fp8 / fp8 Triton kernels.

Causal prefill, batch 1, head_dim 128, heads 8/16/32 with kv heads = heads and heads/4, S = 8192 and
32768. Self-checking; everything goes to stdout and to ``--out DIR`` (JSON, markdown, one log per child).

    python scripts/bench_int8_attention.py --out DIR           # the grid above: < 6 min on one H200
    python scripts/bench_int8_attention.py --quick --out DIR   # S = 8192, 16 heads, 2 configs: < 1 min
    python scripts/bench_int8_attention.py --smoke --out DIR   # CPU, TRITON_INTERPRET=1: the script's own paths

Every piece runs in a child process, so a config that fails to compile, crashes the compiler, faults
or hangs is reported and the rest goes on:

1. preflight, in parallel: each int8 / int8-fp8 / fp8 config compiled and run once on a small causal
   problem (this fills Triton's on-disk cache: later children load, not compile); the bf16 kernel's
   autotune configs compiled the same way; correctness checks: the GPU kernel against the torch model
   of the same arithmetic (``quantized.py``: integer products exact, so they agree to rounding of
   exp2 and fused multiply-adds) over masks, q_offset, GQA, LSE, out= slices, both load paths, and
   the quantization passes against torch's (bit for bit by construction);
2. one child per shape: each variant run once; its relative error ||out - ref|| / ||ref|| against a
   float32 reference on the same bf16 inputs (TF32 off, exact causal, chunked over query rows);
   each 8-bit precision's configs timed (attention alone, eager median), the best one then timed
   three ways by CUDA-graph replay (``triton.testing.do_bench_cudagraph``; eager ``do_bench`` where
   capture fails): total = K/V quantization passes + attention (Q is quantized inside the kernel),
   quantization alone, attention alone. TFLOP/s = causal FLOPs 2*2*B*H*S*S*D/2 over the total time.

Inputs: q, v ~ N(0, 1); k ~ N(0, 1) plus a 10-sigma offset on 4 channels (the channel outliers real
keys have, which K smoothing removes; ``--no-outliers`` for plain Gaussian keys). cuDNN gets K/V with
each kv head repeated (outside the timed call: SDPA's cuDNN path takes equal head counts).
The script stops starting shapes when ``--budget-s`` is spent and says which it skipped.
Exit status 0 when every check passed and every variant ran within its error bound, 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)

SMOKE_ENV = "BENCH_INT8_SMOKE"
if "--smoke" in sys.argv or os.environ.get(SMOKE_ENV) == "1":
    # before triton is imported: the kernels are then built for the CPU interpreter
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ[SMOKE_ENV] = "1"
SMOKE = os.environ.get(SMOKE_ENV) == "1"

import torch  # noqa: E402
import triton  # noqa: E402

PRECISIONS = ("int8", "int8-fp8", "fp8")
VARIANTS = ("cudnn", "triton") + PRECISIONS
LABEL = {"cudnn": "cuDNN bf16", "triton": "Triton bf16", "int8": "int8", "int8-fp8": "int8 QK + fp8 PV",
         "fp8": "fp8"}
# ||out - ref|| / ||ref|| bounds against the float32 reference. Expected (torch model on CPU, rows that
# see up to 32K keys, K with outliers): bf16 ~0.005, int8 ~0.02, int8-fp8 ~0.036, fp8 ~0.05.
ERR_BOUND = {"cudnn": 0.015, "triton": 0.015, "int8": 0.035, "int8-fp8": 0.06, "fp8": 0.08}
# GPU kernel vs the torch model of the same arithmetic: exp2 (ex2.approx) and FMA contraction differ in
# the last bits, which now and then moves one P weight by one rounding step (int8: 1/127 of the block's
# largest weight; fp8: one e4m3 step, up to 1/8 of that weight): relative norm, worst row (relative to
# the largest |value|), LSE (absolute). A wrong kernel (layouts, masks) is off by O(1).
MODEL_TOL, MODEL_ROW_TOL, MODEL_LSE_TOL = 2e-3, 5e-2, 1e-3
QUANT_MISMATCH_TOL = 1e-4  # fraction of 8-bit values allowed to differ by one step from torch's
BF16_QUICK_CONFIG = "128,128,8,3"  # docs/attention_kernel.md: the bf16 kernel's pick at S >= 8192 on H200
OUTLIER_CHANNELS, OUTLIER_SIGMA = 4, 10.0


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

def cfg_dict(bm, bn, w, s, tma=False):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "USE_TMA": bool(tma)}


def cfg_name(c):
    return f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}{' tma' if c['USE_TMA'] else ''}"


def from_triton_config(c):
    return cfg_dict(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["USE_TMA"])


def short(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"


def device_and_dtype():
    if SMOKE:
        return torch.device("cpu"), torch.float16  # the interpreter has no bf16
    return torch.device("cuda"), torch.bfloat16


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(B, Sq, Sk, Hq, Hkv, D, dev, dtype, seed, outliers=True, q_extra_rows=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(B, Sq + q_extra_rows, Hq, D, generator=g, device=dev)
    k = torch.randn(B, Sk, Hkv, D, generator=g, device=dev)
    v = torch.randn(B, Sk, Hkv, D, generator=g, device=dev)
    if outliers:
        ch = torch.randperm(D, generator=g, device=dev)[:OUTLIER_CHANNELS]
        k[..., ch] += OUTLIER_SIGMA
    return q.to(dtype), k.to(dtype), v.to(dtype)


def timer(dev, rep_ms):
    """fn -> (median ms, how). CUDA-graph replays where capture works, else eager do_bench; wall clock on CPU."""
    def run(fn, graph=True):
        if dev.type != "cuda":
            ts = []
            for _ in range(2):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts), "wall"
        if graph:
            try:
                return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"), "graph"
            except Exception as e:  # capture not supported by something in fn
                print(f"    graph capture failed ({short(e)}); eager timing", flush=True)
                torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median"), "eager"
    return run


# ------------------------------------------------------------------------------------------------
# child jobs
# ------------------------------------------------------------------------------------------------

def job_compile(job):
    """One 8-bit config: compile (fills Triton's cache) and run a small causal problem."""
    from fastattn_dist import Causal
    from fastattn_dist.attention import triton_int8 as ti
    dev, dtype = device_and_dtype()
    S = 64 if SMOKE else 256
    q, k, v = make_inputs(1, S, S, 2, 2, job["head_dim"], dev, dtype, seed=1)
    t0 = time.time()
    kv = ti.quantize_kv_triton(k, v, precision=job["precision"])
    out = ti.triton_attention_quantized_kv(q, kv, Causal(), config=job["config"])
    sync(dev)
    return {"ok": bool(torch.isfinite(out).all()), "compile_s": round(time.time() - t0, 1)}


def job_bf16(job):
    """The bf16 Triton kernel: its autotune configs (or the pinned one) compiled on a small causal problem."""
    from fastattn_dist import attention
    dev, dtype = device_and_dtype()
    S = 64 if SMOKE else 256  # > 64 rows: the tuner keeps its 128-row configs
    q, k, v = make_inputs(1, S, S, 2, 2, job["head_dim"], dev, dtype, seed=2)
    t0 = time.time()
    out = attention(q, k, v, "causal", backend="triton")
    sync(dev)
    return {"ok": bool(torch.isfinite(out).all()), "compile_s": round(time.time() - t0, 1)}


def _mask(name, B, Sk, window):
    from fastattn_dist import Causal, KeyPadding, NoMask, SlidingWindow
    if name == "causal":
        return Causal()
    if name == "none":
        return NoMask()
    if name == "window":
        return SlidingWindow(window)
    lens = [max(1, Sk // 2)] + [Sk] * (B - 1)
    return KeyPadding(lens, causal=name == "pad_causal")


def job_check(job):
    """GPU kernel vs the torch model of the same arithmetic, and vs float64 attention."""
    from fastattn_dist.attention import quantized as qz
    from fastattn_dist.attention import triton_int8 as ti
    from fastattn_dist.reference_block import attention64
    dev, dtype = device_and_dtype()
    c = job["case"]
    B, Sq, Sk, Hq, Hkv, D, off = c["B"], c["Sq"], c["Sk"], c["Hq"], c["Hkv"], c["D"], c["q_offset"]
    q, k, v = make_inputs(B, Sq, Sk, Hq, Hkv, D, dev, dtype, seed=Sq + Sk + Hq)
    mask = _mask(c["mask"], B, Sk, c.get("window", 0))
    lse_on = c["lse"]
    buf = view = None
    if c["out_slice"]:  # rows of a [B, S + 8, Hq * D] token buffer, as the tiled block writes them
        buf = torch.randn(B, Sq + 8, Hq * D, device=dev).to(dtype)
        before = buf.clone()
        view = buf[:, 4:Sq + 4].view(B, Sq, Hq, D)
    res = ti.triton_quantized_attention(q, k, v, mask, q_offset=off, precision=c["precision"], return_lse=lse_on,
                                        out=view, config=job["config"], p_max=c.get("p_max", "block"))
    out, lse = res if lse_on else (res, None)
    want = qz.quantized_attention_torch(q, k, v, mask, q_offset=off, precision=c["precision"], return_lse=lse_on,
                                        block_n=job["config"]["BLOCK_N"], p_max=c.get("p_max", "block"))
    want, want_lse = want if lse_on else (want, None)
    sync(dev)
    o, w = out.double().cpu(), want.double().cpu()
    r = {"finite": bool(torch.isfinite(o).all()),
         "model_rel": ((o - w).norm() / w.norm()).item(),
         "model_row_max": ((o - w).abs().amax(-1).max() / w.abs().max()).item()}
    ref, ref_lse = attention64(q, k, v, mask, q_offset=off, return_lse=True)
    r["ref_err"] = ((o - ref).norm() / ref.norm()).item()
    r["ref_bound"] = ERR_BOUND[c["precision"]]
    ok = r["finite"] and r["model_rel"] <= MODEL_TOL and r["model_row_max"] <= MODEL_ROW_TOL \
        and r["ref_err"] <= r["ref_bound"]
    if lse_on:
        lse_c, want_c = lse.double().cpu(), want_lse.double().cpu()
        fin = torch.isfinite(want_c)
        same_inf = bool(torch.equal(fin, torch.isfinite(lse_c)))
        r["lse_vs_model"] = (lse_c[fin] - want_c[fin]).abs().max().item() if fin.any() else 0.0
        rf = torch.isfinite(ref_lse)
        r["lse_vs_ref"] = (lse_c[rf] - ref_lse[rf]).abs().max().item() if rf.any() else 0.0
        ok = ok and same_inf and r["lse_vs_model"] <= MODEL_LSE_TOL
    if buf is not None:
        keep = torch.ones(B, Sq + 8, dtype=torch.bool, device=dev)
        keep[:, 4:Sq + 4] = False
        r["outside_slice_untouched"] = bool(torch.equal(buf[keep], before[keep]))
        ok = ok and r["outside_slice_untouched"]
    r["ok"] = bool(ok)
    return r


def job_quant(job):
    """The Triton quantization passes against torch's quantize_kv, every precision (bit for bit expected)."""
    from fastattn_dist.attention import quantized as qz
    from fastattn_dist.attention import triton_int8 as ti
    dev, dtype = device_and_dtype()
    S = 113 if SMOKE else 1000
    _, k, v = make_inputs(2, 1, S, 4, 4, job["head_dim"], dev, dtype, seed=5)
    kl = torch.tensor([S // 2 + 3, S], device=dev)
    out, ok = {}, True
    for prec in PRECISIONS:
        a = qz.quantize_kv(k, v, precision=prec, key_lengths=kl)
        b = ti.quantize_kv_triton(k, v, precision=prec, key_lengths=kl)
        sync(dev)
        r = {}
        for name in ("k", "v_t"):
            x, y = getattr(a, name), getattr(b, name)
            differ = x.view(torch.uint8) != y.view(torch.uint8)
            xf, yf = x.float(), y.float()
            # one step: int8 +-1; fp8 a neighbouring value (<= 1/8 relative, or the smallest subnormal)
            step = (xf - yf).abs() <= (1.0 if x.dtype == torch.int8 else xf.abs() / 8 + 2.0 ** -9)
            r[name] = {"mismatch": differ.double().mean().item(), "beyond_one_step": int((~step).sum())}
            ok = ok and r[name]["mismatch"] <= QUANT_MISMATCH_TOL and r[name]["beyond_one_step"] == 0
        for name in ("k_scale", "k_mean", "v_scale"):
            x, y = getattr(a, name), getattr(b, name)
            r[name] = {"max_rel": ((x - y).abs() / x.abs().clamp_min(1e-30)).max().item()}
            ok = ok and r[name]["max_rel"] <= 1e-6
        out[prec] = r
    out["ok"] = bool(ok)
    return out


def reference_errors(q, k, v, outs, chunk):
    """||out - ref|| / ||ref|| for each output, against float32 causal attention (TF32 off), chunked over rows."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D)
    dev = q.device
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref_sq = torch.zeros((), dtype=torch.float64, device=dev)
        err_sq = {n: torch.zeros((), dtype=torch.float64, device=dev) for n in outs}
        for b in range(B):
            kf = k[b].float().transpose(0, 1)  # [Hkv, S, D]
            vf = v[b].float().transpose(0, 1)
            for r0 in range(0, S, chunk):
                r1 = min(S, r0 + chunk)
                C = r1 - r0
                # query head h = kv head h // G: rows of one kv group in one matmul, ordered (g, row)
                qg = q[b, r0:r1].float().view(C, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * C, D)
                s = torch.matmul(qg, kf[:, :r1].transpose(1, 2)) * scale
                rows = (torch.arange(C, device=dev) + r0).repeat(G)
                s.masked_fill_(torch.arange(r1, device=dev)[None, :] > rows[:, None], float("-inf"))
                o = torch.matmul(torch.softmax(s, -1), vf[:, :r1])
                del s
                o = o.view(Hkv, G, C, D).permute(2, 0, 1, 3).reshape(C, H, D)
                ref_sq += o.double().square().sum()
                for n, out in outs.items():
                    err_sq[n] += (out[b, r0:r1].float() - o).double().square().sum()
        return {n: math.sqrt(err_sq[n].item() / ref_sq.item()) for n in outs}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def job_shape(job):
    """One shape: every variant's output, error, per-config and final times."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastattn_dist import Causal, attention
    from fastattn_dist.attention import triton_fa
    from fastattn_dist.attention import triton_int8 as ti
    dev, dtype = device_and_dtype()
    S, H, Hkv, D = job["S"], job["heads"], job["kv_heads"], job["head_dim"]
    run = timer(dev, job["rep_ms"])
    q, k, v = make_inputs(1, S, S, H, Hkv, D, dev, dtype, seed=S + 7 * H + Hkv, outliers=job["outliers"])
    mask = Causal()
    flops = 2 * 2 * 1 * H * S * S * D / 2
    res = {"S": S, "heads": H, "kv_heads": Hkv, "head_dim": D, "variants": {}, "configs": {}}
    outs = {}

    def record(name, ms, how, **extra):
        res["variants"][name] = {"ms": ms, "timing": how, "tflops": flops / ms / 1e9, **extra}
        print(f"  {name:9s} {ms:9.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s ({how})"
              + "".join(f" {k}={v:.3f}" for k, v in extra.items() if isinstance(v, float)), flush=True)

    def failed(name, e):
        res["variants"][name] = {"error": short(e)}
        print(f"  {name:9s} FAILED: {short(e)}", flush=True)
        traceback.print_exc()

    # -- cuDNN bf16 ---------------------------------------------------------------------------------
    if dev.type != "cuda":
        res["variants"]["cudnn"] = {"skipped": "no CUDA"}
    else:
        try:
            g = H // Hkv
            kr = k.repeat_interleave(g, 2) if g > 1 else k  # not timed: SDPA's cuDNN path wants equal heads
            vr = v.repeat_interleave(g, 2) if g > 1 else v
            qh, kh, vh = (t.transpose(1, 2) for t in (q, kr, vr))

            def cudnn():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
            outs["cudnn"] = cudnn().transpose(1, 2).contiguous()
            record("cudnn", *run(cudnn))
            del kr, vr, kh, vh
        except Exception as e:
            failed("cudnn", e)

    # -- our bf16 Triton kernel (the first call autotunes this shape bucket) --------------------------
    try:
        out = torch.empty_like(q)
        attention(q, k, v, mask, backend="triton", out=out)
        sync(dev)
        outs["triton"] = out.clone()
        tuned = next(iter(triton_fa._TUNERS.values()), None)
        cfg = getattr(tuned, "best_config", None)
        record("triton", *run(lambda: attention(q, k, v, mask, backend="triton", out=out)),
               config=(from_triton_config(cfg) if cfg is not None else os.environ.get("FASTATTN_TRITON_CONFIG")))
    except Exception as e:
        failed("triton", e)

    # -- 8-bit: configs one by one (attention alone), then the best one three ways ---------------------
    for prec in PRECISIONS:
        cfgs = job["configs"].get(prec, [])
        if not cfgs:
            res["variants"][prec] = {"error": "no config compiled in the preflight"}
            continue
        try:
            out = torch.empty_like(q)
            kv = ti.quantize_kv_triton(k, v, precision=prec)
            per_cfg = {}
            for c in cfgs:
                try:
                    fn = lambda c=c: ti.triton_attention_quantized_kv(q, kv, mask, out=out, config=c)  # noqa: E731
                    fn()
                    sync(dev)
                    per_cfg[cfg_name(c)] = run(fn, graph=False)[0]
                except Exception as e:
                    per_cfg[cfg_name(c)] = None
                    print(f"    {prec} {cfg_name(c)} failed: {short(e)}", flush=True)
            res["configs"][prec] = per_cfg
            ok_cfgs = [c for c in cfgs if per_cfg[cfg_name(c)] is not None]
            if not ok_cfgs:
                raise RuntimeError("every config failed at this shape")
            best = min(ok_cfgs, key=lambda c: per_cfg[cfg_name(c)])
            def total(best=best):
                return ti.triton_quantized_attention(q, k, v, mask, precision=prec, out=out, config=best)
            total()
            sync(dev)
            outs[prec] = out.clone()
            ms_q, _ = run(lambda: ti.quantize_kv_triton(k, v, precision=prec))
            ms_a, _ = run(lambda: ti.triton_attention_quantized_kv(q, kv, mask, out=out, config=best))
            ms, how = run(total)
            record(prec, ms, how, quant_ms=ms_q, attn_ms=ms_a, attn_tflops=flops / ms_a / 1e9, config=best)
            del kv
        except Exception as e:
            failed(prec, e)

    # -- errors against the float32 reference (once per shape) ----------------------------------------
    t0 = time.time()
    errs = reference_errors(q, k, v, outs, chunk=512 if dev.type == "cuda" else 64)
    res["reference_s"] = round(time.time() - t0, 1)
    for n, e in errs.items():
        res["variants"][n]["rel_err"] = e
        res["variants"][n]["err_ok"] = e <= ERR_BOUND[n]
    print("  errors: " + ", ".join(f"{n} {e:.2e}{'' if e <= ERR_BOUND[n] else ' (ABOVE BOUND)'}"
                                   for n, e in errs.items()), flush=True)
    return res


JOBS = {"compile": job_compile, "bf16": job_bf16, "check": job_check, "quant": job_quant, "shape": job_shape}


def child_main(job_path, result_path):
    with open(job_path) as f:
        job = json.load(f)
    if job.get("bf16_config"):
        os.environ["FASTATTN_TRITON_CONFIG"] = job["bf16_config"]
    t0 = time.time()
    try:
        res = JOBS[job["kind"]](job)
    except Exception as e:
        traceback.print_exc()
        res = {"ok": False, "error": short(e)}
    res["seconds"] = round(time.time() - t0, 1)
    with open(result_path, "w") as f:
        json.dump(res, f, indent=1, default=str)


# ------------------------------------------------------------------------------------------------
# the parent: runs children, keeps time, writes the report
# ------------------------------------------------------------------------------------------------

class Children:
    """Runs jobs as child processes of this script, ``parallel`` at a time, each with a timeout."""

    def __init__(self, out_dir, parallel):
        self.dir = os.path.join(out_dir, "logs")
        os.makedirs(self.dir, exist_ok=True)
        self.parallel = parallel

    def run(self, jobs, timeout_s):
        """jobs: {name: job} -> {name: result}; a crash, a non-zero exit or a timeout becomes an error result."""
        pending, running, results = list(jobs.items()), {}, {}
        while pending or running:
            while pending and len(running) < self.parallel:
                name, job = pending.pop(0)
                base = os.path.join(self.dir, name.replace(" ", "_").replace("/", "-"))
                with open(base + ".job.json", "w") as f:
                    json.dump(job, f)
                log = open(base + ".log", "w")
                p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", base + ".job.json",
                                      base + ".result.json"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
                running[name] = (p, log, base, time.time(), job.get("timeout_s", timeout_s))
            time.sleep(0.2)
            for name, (p, log, base, t0, limit) in list(running.items()):
                rc = p.poll()
                if rc is None and time.time() - t0 < limit:
                    continue
                if rc is None:
                    p.kill()  # our own child, by its handle
                    p.wait()
                log.close()
                del running[name]
                results[name] = self._result(base, rc, time.time() - t0, limit)
                yield name, results[name]

    @staticmethod
    def _result(base, rc, seconds, limit):
        tail = ""
        try:
            with open(base + ".log") as f:
                tail = "".join(f.readlines()[-15:])
        except OSError:
            pass
        if rc is None:
            return {"ok": False, "error": f"timed out after {limit:.0f} s", "log_tail": tail}
        try:
            with open(base + ".result.json") as f:
                res = json.load(f)
        except (OSError, ValueError):
            return {"ok": False, "error": f"child exited with status {rc} and no result (crash)", "log_tail": tail}
        if rc != 0:
            res.update(ok=False, error=res.get("error", f"exit status {rc}"))
        if not res.get("ok", True):
            res["log_tail"] = tail
        return res


def check_cases(mode, smoke):
    """(name, case, config) for the correctness children."""
    if smoke:
        c = cfg_dict(32, 32, 4, 1)
        return [("check causal gqa2 lse int8", dict(B=1, Sq=70, Sk=70, Hq=4, Hkv=2, D=64, mask="causal",
                                                     q_offset=0, precision="int8", lse=True, out_slice=False), c),
                ("check pad int8-fp8 tma slice", dict(B=2, Sq=30, Sk=70, Hq=2, Hkv=1, D=64, mask="pad_causal",
                                                      q_offset=40, precision="int8-fp8", lse=True, out_slice=True),
                 dict(c, USE_TMA=True))]
    ptr, tma, small = cfg_dict(128, 64, 8, 3), cfg_dict(128, 128, 8, 3, True), cfg_dict(64, 64, 4, 3)
    cases = [
        ("check causal gqa4 lse int8", dict(B=1, Sq=1000, Sk=1000, Hq=8, Hkv=2, D=128, mask="causal", q_offset=0,
                                            precision="int8", lse=True, out_slice=False), ptr),
        ("check window tile int8 tma", dict(B=1, Sq=300, Sk=1000, Hq=4, Hkv=4, D=128, mask="window", window=100,
                                            q_offset=700, precision="int8", lse=True, out_slice=False), tma),
        ("check pad int8-fp8", dict(B=2, Sq=777, Sk=777, Hq=4, Hkv=1, D=128, mask="pad_causal", q_offset=0,
                                    precision="int8-fp8", lse=True, out_slice=False), ptr),
        ("check fp8 slice tma", dict(B=2, Sq=333, Sk=1000, Hq=8, Hkv=2, D=128, mask="causal", q_offset=667,
                                     precision="fp8", lse=False, out_slice=True), tma),
        ("check none d64 running", dict(B=1, Sq=500, Sk=900, Hq=4, Hkv=2, D=64, mask="none", q_offset=0,
                                        precision="int8", lse=True, out_slice=False, p_max="running"), small),
        ("check pad-full int8 tma", dict(B=2, Sq=600, Sk=600, Hq=4, Hkv=2, D=128, mask="pad_full", q_offset=0,
                                         precision="int8", lse=True, out_slice=False), tma),
    ]
    return cases[:1] if mode == "quick" else cases


def int8_configs(mode, smoke):
    if smoke:
        return [cfg_dict(32, 32, 4, 1), cfg_dict(32, 32, 4, 1, True)]
    from fastattn_dist.attention import triton_int8 as ti
    major = torch.cuda.get_device_capability()[0]
    cfgs = [from_triton_config(c) for c in ti.family_configs(major, 128)]
    return cfgs[:2] if mode == "quick" else cfgs


def fmt_ms(v):
    return "n/a" if v is None else f"{v:.3f}"


def variant_cell(r):
    if r is None:
        return "not run"
    if "error" in r:
        return "FAILED: " + r["error"][:60].replace("|", "/")
    if "skipped" in r:
        return "skipped (" + r["skipped"] + ")"
    cell = f"{r['ms']:.3f} ms, {r['tflops']:.0f} TF/s" + ("" if r.get("timing") == "graph" else f" ({r.get('timing')})")
    if "quant_ms" in r:
        cell += f" (quant {r['quant_ms']:.3f} + attn {r['attn_ms']:.3f})"
    return cell


def markdown(meta, shapes, checks, compiles, skipped):
    L = ["# 8-bit attention benchmark", "",
         f"- command: `{meta['command']}`",
         f"- device: {meta['device']} (cc {meta['cc']}); {meta['date']}; torch {meta['torch']}, "
         f"triton {meta['triton']}, cuDNN {meta['cudnn']}",
         f"- causal prefill, batch 1, head_dim {meta['head_dim']}, {meta['dtype']} inputs; k with "
         + (f"a {OUTLIER_SIGMA:.0f}-sigma offset on {OUTLIER_CHANNELS} channels" if meta["outliers"] else
            "no outliers") + "; TFLOP/s = 2*2*H*S*S*D/2 / total time",
         "- 8-bit total = K/V quantization passes + attention (Q quantized in the kernel), CUDA-graph median; "
         "the best config of the per-config table; errors ||out - ref|| / ||ref|| vs float32 attention",
         f"- checks: {sum(1 for c in checks.values() if c.get('ok'))} of {len(checks)} passed; "
         f"configs compiled: " + ", ".join(f"{p} {sum(1 for c in compiles.get(p, {}).values() if c.get('ok'))}/"
                                           f"{len(compiles.get(p, {}))}" for p in PRECISIONS),
         ""]
    if skipped:
        L += [f"- NOT RUN (time budget): {', '.join(skipped)}", ""]
    bad = {n: c for n, c in checks.items() if not c.get("ok")}
    if bad:
        L += ["## Failed checks", ""]
        L += [f"- {n}: " + json.dumps({k: v for k, v in c.items() if k != "log_tail"}, default=str)[:400]
              for n, c in bad.items()]
        L += [""]
    L += ["## 8-bit configs: attention alone, ms (eager median)", ""]
    names = []
    for s in shapes:
        for p in PRECISIONS:
            for n in s.get("configs", {}).get(p, {}):
                if n not in names:
                    names.append(n)
    L += ["| S | Hq/Hkv | precision | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for s in shapes:
        for p in PRECISIONS:
            pc = s.get("configs", {}).get(p)
            if pc:
                L.append(f"| {s['S']} | {s['heads']}/{s['kv_heads']} | {p} | "
                         + " | ".join(fmt_ms(pc.get(n)) for n in names) + " |")
    L += ["", "## Times and errors", "",
          "| S | Hq/Hkv | " + " | ".join(LABEL[v] for v in VARIANTS)
          + " | best 8-bit vs cuDNN | best 8-bit vs Triton bf16 | rel. error " + " / ".join(VARIANTS) + " |",
          "|---|---|" + "---|" * (len(VARIANTS) + 3)]
    for s in shapes:
        if "variants" not in s:
            L.append(f"| {s['S']} | {s['heads']}/{s['kv_heads']} | FAILED: {s.get('error', '?')[:80]} |"
                     + " |" * (len(VARIANTS) + 2))
            continue
        vs = s["variants"]
        ms = {v: vs[v]["ms"] for v in VARIANTS if v in vs and "ms" in vs[v]}
        best8 = min((ms[p] for p in PRECISIONS if p in ms), default=None)
        vs_c = f"{ms['cudnn'] / best8:.2f}x" if best8 and "cudnn" in ms else "n/a"
        vs_t = f"{ms['triton'] / best8:.2f}x" if best8 and "triton" in ms else "n/a"
        errs = " / ".join((f"{vs[v]['rel_err']:.1e}" + ("" if vs[v]["err_ok"] else "!"))
                          if v in vs and "rel_err" in vs[v] else "-" for v in VARIANTS)
        L.append(f"| {s['S']} | {s['heads']}/{s['kv_heads']} | " + " | ".join(variant_cell(vs.get(v)) for v in VARIANTS)
                 + f" | {vs_c} | {vs_t} | {errs} |")
    L += ["", "(`!` after an error: above its bound " + ", ".join(f"{v} {ERR_BOUND[v]}" for v in VARIANTS) + ")"]
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for bench_int8_attention.{json,md} and logs/")
    ap.add_argument("--quick", action="store_true", help="S = 8192, 16 heads, 2 configs, 1 check: < 1 minute")
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1: tiny shapes (tests the script)")
    ap.add_argument("--seqs", type=int, nargs="+")
    ap.add_argument("--heads", type=int, nargs="+")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rep-ms", type=int, default=25, help="do_bench time per measurement")
    ap.add_argument("--budget-s", type=float, help="start no shape after this many seconds (default 270; quick 45)")
    ap.add_argument("--jobs", type=int, default=max(2, min(12, (os.cpu_count() or 4) - 2)),
                    help="child processes at a time for compiles and checks")
    ap.add_argument("--no-outliers", dest="outliers", action="store_false", help="plain Gaussian keys")
    a = ap.parse_args(argv)
    t_start = time.time()
    mode = "smoke" if SMOKE else ("quick" if a.quick else "full")
    if mode != "smoke" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke on CPU)")
    seqs = a.seqs or {"full": [8192, 32768], "quick": [8192], "smoke": [160]}[mode]
    heads = a.heads or {"full": [8, 16, 32], "quick": [16], "smoke": [4]}[mode]
    budget = a.budget_s if a.budget_s is not None else {"full": 270.0, "quick": 45.0, "smoke": 1e9}[mode]
    bf16_config = BF16_QUICK_CONFIG if mode == "quick" else None
    os.makedirs(a.out, exist_ok=True)
    meta = {"command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), REPO)]
                                             + (argv if argv is not None else sys.argv[1:])),
            "mode": mode, "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "triton": triton.__version__, "head_dim": a.head_dim, "outliers": a.outliers, "rep_ms": a.rep_ms,
            "device": torch.cuda.get_device_name() if mode != "smoke" else "CPU (TRITON_INTERPRET=1)",
            "cc": ".".join(map(str, torch.cuda.get_device_capability())) if mode != "smoke" else "-",
            "cudnn": torch.backends.cudnn.version() if mode != "smoke" else "-",
            "bf16_config": bf16_config or "autotuned",
            "dtype": str(device_and_dtype()[1]).replace("torch.", "")}
    print(f"bench_int8_attention: {meta['device']} (cc {meta['cc']}), mode {mode}, torch {meta['torch']}, "
          f"triton {meta['triton']}", flush=True)
    kids = Children(a.out, a.jobs)

    # -- 1. preflight: compiles and checks, in parallel ----------------------------------------------
    cfgs = int8_configs(mode, SMOKE)
    jobs = {}
    for prec in PRECISIONS:
        for c in cfgs:
            jobs[f"compile {prec} {cfg_name(c)}"] = {"kind": "compile", "precision": prec, "config": c,
                                                     "head_dim": a.head_dim}
    jobs["compile bf16 triton"] = {"kind": "bf16", "head_dim": a.head_dim, "bf16_config": bf16_config}
    for name, case, c in check_cases(mode, SMOKE):
        jobs[name] = {"kind": "check", "case": case, "config": c}
    jobs["check quantization passes"] = {"kind": "quant", "head_dim": a.head_dim}
    compiles, checks = {p: {} for p in PRECISIONS}, {}
    print(f"preflight: {len(jobs)} jobs, {a.jobs} at a time", flush=True)
    for name, r in kids.run(jobs, timeout_s={"full": 240, "quick": 40, "smoke": 600}[mode]):
        status = "ok" if r.get("ok") else "FAILED " + r.get("error", json.dumps(
            {k: v for k, v in r.items() if k not in ("log_tail",)}, default=str)[:300])
        print(f"  [{time.time() - t_start:5.0f} s] {name}: {status} ({r.get('seconds', '?')} s)", flush=True)
        if not r.get("ok") and r.get("log_tail"):
            print("    " + r["log_tail"].replace("\n", "\n    "), flush=True)
        if name.startswith("compile ") and jobs[name]["kind"] == "compile":
            compiles[jobs[name]["precision"]][cfg_name(jobs[name]["config"])] = r
        else:
            checks[name] = r
    good = {p: [c for c in cfgs if compiles[p].get(cfg_name(c), {}).get("ok")] for p in PRECISIONS}

    # -- 2. shapes, cheapest first, while the budget lasts -------------------------------------------
    shapes_todo = [(S, H, Hkv) for S in sorted(seqs) for H in sorted(heads) for Hkv in (H, H // 4) if Hkv >= 1]
    shapes, skipped, last = [], [], None
    for S, H, Hkv in shapes_todo:
        label = f"S={S} H={H}/{Hkv}"
        elapsed = time.time() - t_start
        # the next shape's time, from the last one's, by its work (S^2 H) with a floor for start-up
        guess = 0.0 if last is None else max(5.0, last[1] * (S * S * H) / (last[0][0] ** 2 * last[0][1]))
        if elapsed + guess > budget:
            skipped.append(label)
            continue
        print(f"[{elapsed:5.0f} s] shape {label}", flush=True)
        job = {"kind": "shape", "S": S, "heads": H, "kv_heads": Hkv, "head_dim": a.head_dim, "rep_ms": a.rep_ms,
               "configs": good, "outliers": a.outliers, "bf16_config": bf16_config,
               "timeout_s": max(20.0 if mode == "quick" else 60.0, min(240.0, budget + 45 - elapsed))}
        t0 = time.time()
        for _, r in kids.run({f"shape {S} {H} {Hkv}": job}, timeout_s=job["timeout_s"]):
            if "variants" not in r:
                print(f"  FAILED: {r.get('error')}\n    " + r.get("log_tail", "").replace("\n", "\n    "), flush=True)
                r = {"S": S, "heads": H, "kv_heads": Hkv, "error": r.get("error", "?")}
            else:
                with open(os.path.join(kids.dir, f"shape_{S}_{H}_{Hkv}.log")) as f:
                    sys.stdout.write(f.read())
            shapes.append(r)
        last = ((S, H), time.time() - t0)

    # -- 3. report ------------------------------------------------------------------------------------
    meta["seconds"] = round(time.time() - t_start, 1)
    md = markdown(meta, shapes, checks, compiles, skipped)
    with open(os.path.join(a.out, "bench_int8_attention.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out, "bench_int8_attention.json"), "w") as f:
        json.dump({"meta": meta, "error_bounds": ERR_BOUND, "compiles": compiles, "checks": checks,
                   "shapes": shapes, "skipped": skipped}, f, indent=1, default=str)
    failures = [n for n, c in checks.items() if not c.get("ok")]
    failures += [f"compile {p} {n}" for p in PRECISIONS for n, c in compiles[p].items() if not c.get("ok")]
    for s in shapes:
        if "variants" not in s:
            failures.append(f"shape S={s['S']} H={s['heads']}/{s['kv_heads']}")
            continue
        for v, r in s["variants"].items():
            if "error" in r or r.get("err_ok") is False:
                failures.append(f"S={s['S']} H={s['heads']}/{s['kv_heads']} {v}")
    print(f"\nwritten: {os.path.join(a.out, 'bench_int8_attention.json')}, .md, logs/; {meta['seconds']} s")
    print(f"SELF-CHECK: {'PASS' if not failures else 'FAIL'}" + ("" if not failures else ": " + "; ".join(failures)))
    print()
    print(md)
    return 0 if not failures else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
