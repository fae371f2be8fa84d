"""``fastattn-dist bench-model``: the model's prefill and decode against transformers and tiles=1, long contexts,
and one rank of a TP=N deployment emulated on one GPU (the measurements: models/bench_model.py).

Everything checkable is checked before a rank starts: a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date

import torch

from ..models.bench_model import BenchModelOptions, bench_model_rank
from ..models.offload_plan import check_gpu_budget
from ..models.presets import MODEL_HELP, SHAPES, model_config, resolve_model
from ..parallel.link_models import GpuLinkModel, LinkModel
from ..profiler.export import write_outputs
from ..profiler.metrics import format_runs
from ..profiler.report import render
from ..runner import run_job
from .model_options import (add_budget_options, check_cache_fits, check_precision_offload, check_world, gib_bytes,
                            offload_arg, rank_sizing)
from .options import (add_precision_option, add_rank_options, add_standin_path, launch_from_args, nonneg_int, out_dir,
                      parse_dtype, positive_float, positive_int)

EMULATION_ROWS = [(1, 2048), (1, 8192), (1, 32768), (4, 2048)]


def _check_hf(want: bool) -> None:
    if want:
        try:
            import transformers  # noqa: F401  (the 'hf' extra: only the baselines need it)
        except ImportError:
            raise ValueError("the transformers baselines need the 'hf' extra (pip install 'fastattn-dist[hf]'); "
                             "or pass --no-hf") from None


def context_arg(value: str):
    """A ``--context`` value: a number of tokens >= 1, or "max" (the longest context both tiers hold)."""
    if value != "max" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected a number of tokens >= 1 or 'max', got {value!r}")
    return value if value == "max" else int(value)


def _context_budgets(args, gpu: bool, modes) -> dict:
    """The long-context mode's budgets, checked (the sizes are checked per world size by ``_context_fits``)."""
    if not args.context:
        if args.host_budget_gb is not None or args.gpu_budget_gb is not None:
            raise ValueError("--host-budget-gb and --gpu-budget-gb go with --context (long-context mode)")
        return {}
    if args.gpu_budget_gb is not None and not gpu:
        raise ValueError("--gpu-budget-gb caps a GPU's memory: this run is on CPU")
    check_precision_offload(args.attn_precision, modes)
    if "max" in args.context and not gpu and "off" in modes:
        raise ValueError("--context max with --kv-offload off needs a GPU (a CPU device tier has no memory limit); "
                         "give a number of device tokens, e.g. --kv-offload 16")
    return {"host_budget_gb": args.host_budget_gb, "gpu_budget_gb": args.gpu_budget_gb}


def _context_fits(args, cfg, dtype: torch.dtype, modes, world: int) -> None:
    """Sizes against budgets before any rank computes: a GPU budget must hold a rank's weights; when no requested run
    fits its budgets, the first reason is the error (else the runs that cannot fit are rows with their reason)."""
    if not args.context:
        return
    if args.gpu_budget_gb is not None:
        check_gpu_budget(rank_sizing(cfg, dtype, world), 1, gib_bytes(args.gpu_budget_gb))
    errors, numeric = [], [c for c in args.context if c != "max"]
    for ctx in numeric:
        for mode in modes:
            try:
                check_cache_fits(cfg, dtype, world, offload_arg(mode), ctx + args.decode_tokens, 1, args.host_budget_gb,
                                 args.gpu_budget_gb)
            except ValueError as e:
                errors.append(e)
    if errors and len(numeric) == len(args.context) and len(errors) == len(modes) * len(numeric):
        raise errors[0]


def _modes(args, gpu: bool):
    modes = args.kv_offload if args.kv_offload is not None else (["off", "auto"] if gpu else ["off"])
    modes = [offload_arg(m) for m in modes]
    if not args.context and args.kv_offload is not None:
        raise ValueError("--kv-offload goes with --context (long-context mode)")
    if "auto" in modes and not gpu:
        raise ValueError("--kv-offload auto splits the KV cache between a GPU and host memory: this run is on CPU "
                         "(give a number of tokens to split a CPU cache, e.g. --kv-offload off 1024)")
    return [str(m) for m in modes]


def _emulation(args, gpu: bool) -> dict:
    """The emulation's options (rows, stand-in), checked: ``--emulate-tp N`` plays rank 0 of TP=N on one device."""
    if args.context or args.profile:
        raise ValueError("--emulate-tp times prefill and decode rows: not with --context or --profile")
    n = args.emulate_tp
    standin = None
    if gpu:
        over = {k: v for k, v in (("latency_us", args.standin_latency_us), ("bus_gbps", args.standin_gbps),
                                  ("small_latency_us", args.standin_small_latency_us)) if v is not None}
        standin = GpuLinkModel.for_world_size(max(2, n), path=args.standin_path, **over) if n > 1 else None
    rows = [(b, s) for b, s in ([(args.batch, s) for s in args.seq] if args.seq else EMULATION_ROWS)]
    if not gpu and not args.seq:
        rows = [(1, 96), (2, 40)]  # CPU: the code path on small prompts
    return {"emulate_tp": n, "standin": standin, "rows": rows, "tile_counts": args.tile_counts,
            "decode_batches": args.decode_batches if gpu else [1], "decode_prompt": 2048 if gpu else 32}


def cmd_bench_model(args) -> int:
    launch = launch_from_args(args)
    if args.emulate_tp:
        launch.world_size = 1
        launch.dist_backend = "nccl" if torch.cuda.is_available() else "gloo"
    gpu = launch.device_type() == "cuda"
    if args.model in SHAPES and not gpu:
        raise ValueError(f"--model {args.model} needs a GPU (its weights alone are GBs)")
    if args.layers is not None and args.model not in ("tiny", *SHAPES):
        raise ValueError("--layers applies to --model tiny and the built-in shapes")
    path = resolve_model(args.model, args.layers if args.model == "tiny" else None)
    cfg = model_config(path)
    numeric = [c for c in args.context or [] if c != "max"]
    longest = max(numeric or [0]) if args.context else max(args.seq or [1024])
    if longest + args.decode_tokens > cfg.max_position_embeddings:
        raise ValueError(f"{'--context' if args.context else '--seq'} {longest} + --decode-tokens "
                         f"{args.decode_tokens} exceeds the model's context ({cfg.max_position_embeddings})")
    want_hf = not args.no_hf and not args.emulate_tp and not args.context
    _check_hf(want_hf)
    modes = _modes(args, gpu)
    for folder, option in ((args.out, "--out"), (args.profile, "--profile")):
        if folder:
            out_dir(folder, option)
    if args.context and args.profile:
        raise ValueError("--profile and --context do not go together")
    if args.seq and len(args.seq) > 1 and not args.emulate_tp:
        raise ValueError("--seq takes one length (several go with --emulate-tp: one row each)")
    extra = _emulation(args, gpu) if args.emulate_tp else {}
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    extra.update(_context_budgets(args, gpu, modes))
    if args.emulate_tp:
        check_world(path if args.layers is None or path not in SHAPES else path, args.emulate_tp)
    link = None if (args.no_link or gpu) else LinkModel(args.link_latency_us, args.link_gbps)
    opts = BenchModelOptions(path, args.model, dtype, batch=args.batch, seq=(args.seq or [1024])[0],
                             layers=args.layers if path in SHAPES else None, decode_tokens=args.decode_tokens,
                             repeats=args.repeats, warmup=args.warmup, seed=args.seed, hf=want_hf, link=link,
                             profile=bool(args.profile), contexts=args.context or [],
                             kv_offload=modes if args.context else [], attn_precision=args.attn_precision, **extra)
    res = run_job(bench_model_rank, launch, (opts,), check_world=None if args.emulate_tp else
                  (lambda w: check_world(path, w) or _context_fits(args, cfg, dtype, modes, w)), label="bench-model")
    if res is None:
        return 0
    res.update(command="fastattn-dist " + " ".join(sys.argv[1:]), date=date.today().isoformat(), torch=torch.__version__,
               device_name=torch.cuda.get_device_name(0) if gpu else (platform.processor() or "CPU"))
    if args.emulate_tp:
        print(emulation_markdown(res))
        return _write_results(res, args, f"bench_emulated_tp{args.emulate_tp}")
    if args.context:
        print(context_markdown(res))
        return _write_results(res, args, "bench_context")
    _write_profile(res, args)
    print(markdown(res))
    return _write_results(res, args, "bench_model")


def _write_profile(res: dict, args) -> None:
    prof = res.pop("profile", None)
    if prof is None:
        return
    files, summary = render(prof, True, {"command": res["command"]})
    paths = write_outputs(args.profile, files)
    res["profile_runs"] = {k: {m: v[m] for m in ("tiles", "block_ms", "compute_ms", "comm_ms", "exposed_comm_ms",
                                                 "overlap_fraction")} for k, v in summary["runs"].items()}
    print(format_runs(summary))
    print("wrote " + ", ".join(paths), file=sys.stderr)


def out_label(model: str) -> str:
    """The model's part of an output file name: the built-in names, else 'ckpt' (a path has slashes)."""
    return model if model in ("tiny", *SHAPES) else "ckpt"


def _write_results(res: dict, args, kind: str) -> int:
    """``--out``: ``<kind>_<model label>.json`` there; ``--json``: the same object on the last line."""
    if args.out:
        with open(os.path.join(args.out, f"{kind}_{out_label(args.model)}.json"), "w") as f:
            json.dump(res, f, indent=1)
    if args.json:
        print(json.dumps(res))
    return 0


def emulation_markdown(r: dict) -> str:
    lines = [f"Command: `{r['command']}`  ", f"Device: {r['device_name']}; torch {r['torch']}; {r['dtype']}; date "
             f"{r['date']}; emulated rank 0 of TP={r['emulate_tp']} ({r['model']}, {r['layers']} layers, "
             f"{r['weights']} weights)  ", f"**Comm is modelled, not measured**: {r['comm']}  ",
             "Time to first token in ms (median, each variant timed in turn within every repeat); compute = the same "
             "plan with comm off; comm = the plan's all-reduces alone; ceiling = max(compute, comm) of auto + its "
             "last tile's all-reduce; speedups are of auto over tiles=1.", "",
             "| B x S | tiles=1 | auto (tiles) | speedup | fixed plans | best fixed / auto | compute t=1 | compute auto "
             "| comm auto | ceiling (speedup) | logits rel err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        ms = row["ms"]
        fixed = ", ".join(f"{k[1:]}: {ms[k]:.2f}" for k in ms if k.startswith("t") and k[1:].isdigit())
        ratio = row["auto_vs_best_fixed"]
        speed = "1.00x (auto = tiles=1)" if row["auto_is_tiles1"] else f"{row['speedup_auto']:.2f}x"
        lines.append(f"| {row['batch']} x {row['seq']} | {ms['tiles1']:.2f} | {ms['auto']:.2f} ({row['auto_tiles']}) | "
                     f"{speed} | {fixed or '-'} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"{ms['compute_tiles1']:.2f} | {ms['compute_auto']:.2f} | {ms['comm_auto']:.2f} | "
                     f"{row['ceiling_ms']:.2f} ({row['ceiling_speedup']:.2f}x) | {row['logits_rel_err']:.1e} |")
    if r["decode"]:
        lines += ["", "| decode batch | prompt | tokens/s | bound tokens/s | share | bound by |", "|---|---|---|---|---|---|"]
        for d in r["decode"]:
            lines.append(f"| {d['batch']} | {d['prompt']} | {d['tokens_per_s']:.1f} | {d['bound_tokens_per_s']:.1f} | "
                         f"{d['share_of_bound']:.0%} | {d['bound_by']} |")
    return "\n".join(lines)


def _prefill_ratio(r: dict, run: dict) -> str:
    """This run's prefill rate against the one-tier run at the same context, measured in the same command."""
    off = next((o for o in r["runs"] if o["context"] == run["context"] and o["kv_offload"] == "off"
                and "error" not in o), None)
    if off is None or run["kv_offload"] == "off":
        return ""
    return f" ({run['prefill_tokens_per_s'] / off['prefill_tokens_per_s']:.2f}x of off)"


def _decode_host(run: dict) -> str:
    if not run.get("decode_host"):
        return "-"
    shares = run.get("decode_share_measured")
    busy = "" if not shares else (f"; busy: CPU {shares['cpu_attention']:.0%}, copies "
                                  f"{shares['host_to_device_copies']:.0%}, device tier {shares['device_tier_attention']:.0%}")
    rate = f", {run['decode_host_read_gbps']:.1f} GB/s" if "decode_host_read_gbps" in run else ""
    return f"{run['decode_host']} ({run['decode_cpu_share']:.0%} CPU){rate}{busy}"


def context_markdown(r: dict) -> str:
    budget = r.get("gpu_budget_gb")
    view = f"; **GPU budget {budget:g} GB: a smaller GPU's view**" if budget else ""
    lines = [f"Command: `{r['command']}`  ", f"Device: {r['device_name']} ({r['world']} ranks){view}; torch {r['torch']}; "
             f"date {r['date']}; host budget {r.get('host_budget_gib', 0):.3g} GiB; longest context the device alone "
             f"holds: {r.get('longest_without_offload', '-')} tokens  ",
             "", "| context | kv offload | prefill tokens/s | decode tokens/s | KV on device GiB | KV on host GiB | "
             "prefill chunk | decode host tier (CPU share), read rate; tier busy shares of decode time |",
             "|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        if "error" in run:
            lines.append(f"| {run['context']} | {run['kv_offload']} | refused: {run['error'][:200]} | | | | | |")
            continue
        lines.append(f"| {run['context']} | {run['kv_offload']} | {run['prefill_tokens_per_s']:.0f}{_prefill_ratio(r, run)} | "
                     f"{run['decode_tokens_per_s']:.2f} | {run['kv_device_gib']:.1f} | {run['kv_host_gib']:.1f} | "
                     f"{run['prefill_chunk']} | {_decode_host(run)} |")
    for run in r["runs"]:
        cap = run.get("context_max")
        if cap:
            lines.append(f"\n--context max, kv offload {run['kv_offload']}: {cap['cache_tokens']} tokens of cache "
                         f"(context {run['context']} + the decode steps) = {cap['share_of_bound']:.1%} of the bound "
                         f"{cap['bound_tokens']} = (device memory free after the weights and one chunk's activations "
                         "+ the host budget) / KV bytes per token")
    plans = [run["kv_plan"] for run in r["runs"] if run.get("decode_host")]
    if plans:
        lines.append(f"\nPlan of the last offloaded run: {plans[-1]}")
    lines.append("\nTier busy shares are measured over the decode steps (CPU kernel wall time on its worker thread, "
                 "copy-engine time of the streamed blocks and device-tier attention by CUDA events); the tiers run at "
                 "once, so the shares overlap.")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    lines = [f"Command: `{r['command']}`  ", f"Device: {r['device_name']} ({r['world']} ranks, {r['dtype']}); torch "
             f"{r['torch']}; date {r['date']}; prompt {r['batch']} x {r['seq']} tokens, our prefill plan {r.get('plan')}  ",
             "", "| prefill | ms | tokens/s | speedup of ours over this row | MFU |", "|---|---|---|---|---|"]
    ours = r["prefill_ms"]["ours"]
    for k, ms in r["prefill_ms"].items():
        mfu = r.get("mfu", {}).get(k)
        lines.append(f"| {k} | {ms:.2f} | {r['prefill_tokens_per_s'][k]:.0f} | {ms / ours:.2f}x | "
                     f"{'-' if mfu is None else f'{mfu:.0%}'} |")
    lines += ["", "| decode | tokens/s | share of the bandwidth bound |", "|---|---|---|"]
    for k, tps in r["decode_tokens_per_s"].items():
        share = r.get("decode_share_of_bound", {}).get(k)
        lines.append(f"| {k} | {tps:.1f} | {'-' if share is None else f'{share:.0%}'} |")
    if "copy_gbps" in r:
        lines.append(f"\nCeilings measured in the same run: bf16 GEMM {r['gemm_tflops']:.0f} TFLOP/s, device copy "
                     f"{r['copy_gbps']:.0f} GB/s (read + written); decode bound {r['decode_bound_tokens_per_s']:.1f} "
                     "tokens/s (weights but the embedding table + KV read once per step)")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("bench-model", help="time prefill and decode of the TP model against transformers "
                                           "(eager and sdpa) and our model with tiles=1")
    add_rank_options(p, world_default=2)
    p.add_argument("--model", default="tiny", help=MODEL_HELP + "; default tiny")
    p.add_argument("--context", type=context_arg, nargs="*", default=None,
                   help="long-context mode: prefill each of these contexts, then --decode-tokens steps, per --kv-offload; "
                        "'max': the longest context both tiers hold (computed from sizes, per mode)")
    add_budget_options(p, "with --context: ")
    p.add_argument("--kv-offload", nargs="+", default=None,
                   help="with --context: KV cache modes to run: off, auto (GPU), or a number of tokens on the device "
                        "(default: off auto on GPUs, off on CPU)")
    p.add_argument("--seq", type=positive_int, nargs="+", default=None,
                   help="prompt tokens per sequence (default 1024; with --emulate-tp several: the rows, default "
                        "2048, 8192, 32768 and 4 x 2048)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per prompt batch (default 1)")
    p.add_argument("--decode-tokens", type=positive_int, default=32, help="decode steps timed (default 32)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPUs, float32 on CPU")
    p.add_argument("--no-hf", action="store_true",
                   help="skip the transformers baselines (they run at --world-size 1 only, or with --model 7b/7b-mha)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed prefills per variant (default 5)")
    p.add_argument("--warmup", type=nonneg_int, default=3, help="untimed runs before timing (default 3: the first runs plan tiles and allocate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default 0)")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="a slice of the model: this many layers (--model tiny or a built-in shape; default all)")
    p.add_argument("--link-latency-us", type=float, default=50.0, help="simulated link of CPU ranks (default 50)")
    p.add_argument("--link-gbps", type=float, default=0.04,
                   help="simulated link bandwidth of CPU ranks, GB/s (default 0.04: a prefill's all-reduces then take "
                        "about what its compute takes, as at TP=4 on H200s)")
    p.add_argument("--no-link", action="store_true", help="no simulated link")
    p.add_argument("--profile", default=None, help="record the 1-tile and the tiled prefill: timeline, trace and "
                                                   "metrics into this folder")
    p.add_argument("--out", default=None, help="folder for the JSON: bench_model_<name>.json (bench_context_<name>.json "
                                               "with --context, bench_emulated_tp<N>_<name>.json with --emulate-tp), "
                                               "name = the --model preset, or ckpt for a directory")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    add_precision_option(p)
    g = p.add_argument_group("one rank of a TP=N model on one GPU (the comm stand-in; on CPU the simulated link)")
    g.add_argument("--emulate-tp", type=positive_int, default=None,
                   help="play rank 0 of a TP=N group: its shard of every layer, every collective modelled")
    g.add_argument("--tile-counts", type=positive_int, nargs="*", default=[2, 3, 4],
                   help="fixed tile counts timed beside tiles=1 and auto (default 2 3 4)")
    g.add_argument("--decode-batches", type=positive_int, nargs="*", default=[1, 8],
                   help="decode rows after a 2048-token prompt (default 1 8)")
    g.add_argument("--standin-latency-us", type=positive_float, default=None,
                   help="the stand-in's latency from 16 MB (default: the fit for the TP size, link_models.py)")
    g.add_argument("--standin-small-latency-us", type=positive_float, default=None,
                   help="the stand-in's latency below 256 KiB (default: link_models.py's figure for the TP size)")
    g.add_argument("--standin-gbps", type=positive_float, default=None,
                   help="the stand-in's bus bandwidth in GB/s (default: the fit for the TP size)")
    add_standin_path(g)
    p.set_defaults(func=cmd_bench_model)
