"""What every rank of ``bench-model`` measures (the CLI and its tables are cli/bench_model.py).

Three modes, every variant of a mode timed in the same run:

* **standard**: our prefill with ``tiles="auto"`` and ``tiles=1`` (timed in turn within each repeat), transformers
  (eager, sdpa) with the same weights where it can run, decode tokens/s of ours and of transformers (each timed
  over its decode steps alone), and on GPUs the two ceilings (bf16 GEMM rate, device copy rate) measured now;
* **long context** (``contexts``, a number or "max": the longest context both tiers hold): prefill and decode per
  KV offload mode (kv_offload.py), each tier's share of the decode time, within optional host and GPU budgets;
* **emulation** (``emulate_tp`` = N): this one process plays rank 0 of a TP=N model: that rank's shard (its heads,
  kv heads, intermediate and vocabulary slices, every layer), every collective replaced by the comm stand-in
  (the GPU's modelled NCCL, or on CPU the simulated link). Per prompt shape: time to first token of every plan
  (tiles=1, auto, fixed counts), each one's compute alone (comm off), the comm alone, the ceiling and the logits
  of auto against tiles=1; then decode tokens/s against its bound. Modelled comm: labelled so everywhere.
"""
from __future__ import annotations

import sys
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ..parallel.comm import NoComm
from ..parallel.emulated_comm import LinkStandIn, StandInAllReduce
from ..parallel.graphs import capture_cuda, run_eagerly
from ..parallel.link_models import GpuLinkModel, LinkModel
from ..parallel.tile_plan import TilePlan
from ..profiler.gather import estimate_clock_offsets, gather_profile
from ..recorder import SpanRecorder
from ..runner import barrier, interleaved_median_ms, job_device, median_ms, sync
from .checkpoint import Checkpoint
from .generate import GenerateStats
from .kv_offload import TieredKVCache, TierTiming
from .llama import LlamaForCausalLM
from .offload_plan import GIB, default_host_budget, device_free_bytes, longest_context, measure_rates
from .presets import SHAPES, preset_config


@dataclass(frozen=True)
class BenchModelOptions:
    model: str                      # a checkpoint directory or a preset name (presets.py)
    label: str                      # what --model said (tables, file names)
    dtype: torch.dtype
    _: KW_ONLY                      # the rest by name: a reorder of these fields cannot mix up a caller's values
    batch: int = 1
    seq: int = 1024
    layers: Optional[int] = None    # a preset with this many layers (a slice of the model)
    decode_tokens: int = 32
    repeats: int = 5
    warmup: int = 3
    seed: int = 0
    hf: bool = True
    link: Optional[LinkModel] = None
    profile: bool = False
    contexts: List[Union[int, str]] = field(default_factory=list)   # token counts, or "max"
    kv_offload: List[str] = field(default_factory=list)
    emulate_tp: Optional[int] = None
    standin: Optional[GpuLinkModel] = None
    rows: List[Tuple[int, int]] = field(default_factory=list)   # (batch, seq) prompts of the emulation
    tile_counts: List[int] = field(default_factory=list)
    decode_batches: List[int] = field(default_factory=list)
    decode_prompt: int = 2048
    attn_precision: str = "bf16"    # the model's attention arithmetic (--attn-precision)
    host_budget_gb: Optional[float] = None   # long context: the host tier's budget (default: 80% of what is free)
    gpu_budget_gb: Optional[float] = None    # long context: the device memory to use, as on a smaller GPU


def log_on(rank: int) -> Callable[[str], None]:
    return (lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)


def random_ids(vocab: int, batch: int, seq: int, seed: int, device) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def config_of(opts: BenchModelOptions):
    """The model's config, cut to ``opts.layers`` layers when asked (a checkpoint's first layers are read)."""
    cfg = preset_config(opts.model) if opts.model in SHAPES else Checkpoint(opts.model).config
    return cfg if opts.layers is None else cfg.replace(num_hidden_layers=opts.layers)


def build_model(opts: BenchModelOptions, device, comm="nccl", max_seq_len: int = 0) -> LlamaForCausalLM:
    """Our model on ``device`` with the preset's random weights or the checkpoint's (this rank's slices)."""
    cfg = config_of(opts)
    model = LlamaForCausalLM(cfg, dtype=opts.dtype, device=device, comm=comm, link=opts.link,
                             max_seq_len=max_seq_len or min(cfg.max_position_embeddings, opts.seq + opts.decode_tokens + 1),
                             attn_precision=opts.attn_precision)
    if opts.model in SHAPES:
        model.init_random_weights(opts.seed)
    else:
        model.load(Checkpoint(opts.model))
    return model


# -- ceilings ------------------------------------------------------------------------------------------------
def peak_and_copy(device: torch.device) -> dict:
    """The two ceilings, measured now: a large bf16 GEMM's FLOP/s and a device copy's bytes/s (read + written)."""
    if device.type != "cuda":
        return {}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    gemm_ms = median_ms(lambda: a @ a, device, 10, 3)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x), device, 10, 3)
    del a, x, y
    return {"gemm_tflops": 2 * 8192 ** 3 / gemm_ms / 1e9, "copy_gbps": 2 * (1 << 30) / copy_ms / 1e6}


def model_flops(cfg, batch: int, seq: int) -> float:
    """Prefill FLOPs: 2 x params (without the embedding table) per token, plus causal attention."""
    D = cfg.head_dim
    per_layer = cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D + \
        cfg.num_attention_heads * D * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    params = cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size  # + LM head
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * D * seq * (seq + 1) / 2
    return batch * (2 * params * seq + attn)


def decode_bytes(model: LlamaForCausalLM, batch: int, kv_len: int) -> float:
    """Bytes one decode step must read on this rank: every weight but the embedding table once (the LM head's
    once, tied or not), and each sequence's keys and values."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed."))
    if model.lm_head.tied:
        weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return weights + batch * kv_len * model.kv_bytes_per_token()


# -- transformers ----------------------------------------------------------------------------------------------
class StateDictCheckpoint:
    """The ``read`` of models.checkpoint.Checkpoint over tensors in memory (a random model shared with HF)."""

    def __init__(self, config, tensors: dict) -> None:
        self.config, self.tensors = config, tensors

    def read(self, name, dim=None, start=0, end=None, *, dtype=None, device=None):
        t = self.tensors[name]
        if dim is not None:
            t = t.narrow(dim, start, (t.shape[dim] if end is None else end) - start)
        return t.to(device=device, dtype=dtype)


def hf_model(opts: BenchModelOptions, cfg, device):
    """The transformers model of the benchmark: the checkpoint's, or the preset's shape with random weights."""
    import transformers  # the 'hf' extra: the benchmark's baseline only

    if opts.model not in SHAPES:
        return transformers.AutoModelForCausalLM.from_pretrained(opts.model, dtype=opts.dtype,
                                                                 attn_implementation="sdpa").to(device).eval()
    torch.manual_seed(opts.seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_dict()),
                                                              dtype=opts.dtype, attn_implementation="sdpa")
    return model.eval()


def set_attn_impl(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl


def hf_decode_tokens_per_s(hf, ids: torch.Tensor, steps: int, device: torch.device) -> float:
    """transformers' decode rate, timed over its decode steps alone (greedy, its own KV cache): one prefill
    untimed, then ``steps`` single-token forwards between two clock reads. A rate measured directly, never
    the difference of two end-to-end timings (which include a prefill each and went negative under load)."""
    out = hf(ids, use_cache=True, logits_to_keep=1)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = hf(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    return ids.shape[0] * steps / (time.perf_counter() - t0)


# -- the standard mode ----------------------------------------------------------------------------------------
def standard(rank: int, world: int, opts: BenchModelOptions) -> Optional[dict]:
    device, log = job_device(), log_on(rank)
    ours = build_model(opts, device)
    cfg, hf = ours.config, None
    if opts.hf and (world == 1 or opts.model in SHAPES):
        log("[bench-model] building the transformers model (same weights)")
        hf = hf_model(opts, cfg, device)
        if opts.model in SHAPES:
            ours.load(StateDictCheckpoint(cfg, dict(hf.state_dict())))
    elif opts.hf:
        log("[bench-model] no transformers baselines: they run at --world-size 1 only (one process, whole model)")
    B, S, n = opts.batch, opts.seq, opts.decode_tokens
    ids = random_ids(cfg.vocab_size, B, S, opts.seed, device)
    profile = profile_prefill(ours, ids, opts) if opts.profile else None
    res = {"model": opts.label, "batch": B, "seq": S, "world": world, "device": str(device),
           "dtype": str(opts.dtype).replace("torch.", ""), "prefill_ms": {}, "decode_tokens_per_s": {}}
    with torch.no_grad():
        log(f"[bench-model] prefill ours, tiles auto and 1, in turn ({B} x {S} tokens)")
        res["prefill_ms"].update(interleaved_median_ms(
            {"ours": lambda: ours(ids, tiles="auto", last_only=True),
             "ours_tiles1": lambda: ours(ids, tiles=1, last_only=True)}, device, opts.repeats, opts.warmup))
        res["plan"] = list(ours.plan_for(B, S, "auto").bounds)
        for impl in ("eager", "sdpa") if hf is not None else ():
            log(f"[bench-model] prefill transformers {impl}")
            set_attn_impl(hf, impl)
            res["prefill_ms"][f"hf_{impl}"] = median_ms(lambda: hf(ids, logits_to_keep=1), device, opts.repeats,
                                                        opts.warmup)
        log(f"[bench-model] decode ({n} steps after the prompt)")
        st = GenerateStats()
        for _ in range(2):  # the first run captures the graph and warms up
            ours.generate(ids, n, stop_tokens=[], stats=st)
        res["decode_tokens_per_s"]["ours"] = st.decode_tokens_per_s
        if hf is not None:
            set_attn_impl(hf, "sdpa")
            res["decode_tokens_per_s"]["hf_sdpa"] = hf_decode_tokens_per_s(hf, ids, n, device)
    if rank != 0:
        return None
    if profile is not None:
        res["profile"] = profile
    res.update(peak_and_copy(device))
    add_rates(res, ours, world, n)
    return res


def add_rates(res: dict, ours: LlamaForCausalLM, world: int, decode_tokens: int) -> None:
    """Tokens/s, MFU against the measured GEMM rate, decode against the bandwidth bound (measured copy rate)."""
    B, S, cfg = res["batch"], res["seq"], ours.config
    flops = model_flops(cfg, B, S) / world
    for label, ms in res["prefill_ms"].items():
        res.setdefault("prefill_tokens_per_s", {})[label] = B * S / (ms / 1e3)
        if "gemm_tflops" in res:
            f = flops if label.startswith("ours") else flops * world  # transformers runs the whole model here
            res.setdefault("mfu", {})[label] = f / (ms / 1e3) / (res["gemm_tflops"] * 1e12)
    if "copy_gbps" in res:
        per_step = decode_bytes(ours, B, S + decode_tokens // 2)
        res["decode_bound_tokens_per_s"] = bound = B / (per_step / (res["copy_gbps"] * 1e9))
        res["decode_share_of_bound"] = {k: v / bound for k, v in res["decode_tokens_per_s"].items()}


# -- the emulation mode -------------------------------------------------------------------------------------
def emulated_comm(opts: BenchModelOptions, device: torch.device):
    """The stand-in of rank 0 of a TP=N group: the GPU's modelled NCCL, or on CPU the simulated link (TP=1: none)."""
    if opts.emulate_tp == 1:
        return NoComm(1, 0)
    if device.type == "cuda":
        return StandInAllReduce(opts.emulate_tp, opts.standin or GpuLinkModel.for_world_size(opts.emulate_tp), device)
    return LinkStandIn(opts.emulate_tp, opts.link or LinkModel(50.0, 0.04))


class PrefillVariant:
    """One timed prefill (time to first token: every layer, then the last position's logits) of one plan over
    one comm path: a CUDA-graph replay on GPUs (no launch gaps in either variant), the eager call on CPU."""

    def __init__(self, model: LlamaForCausalLM, ids: torch.Tensor, plan: TilePlan, comm,
                 schedule: Optional[str] = None) -> None:
        self.model, self.ids, self.plan, self.comm = model, ids, plan, comm
        self.schedule = schedule or model.prefill_schedule
        self.logits: Optional[torch.Tensor] = None
        capture = capture_cuda if ids.is_cuda else run_eagerly
        self.replay = capture(self._run)

    def _run(self) -> None:
        m, (B, S) = self.model, self.ids.shape
        prev, prev_schedule = m.swap_comm(self.comm), m.prefill_schedule
        m.prefill_schedule = self.schedule
        try:
            # one per-layer scratch for every variant: the graphs of all variants point at the same buffers
            h = m._prefill(self.ids, None, m._scratch_kv(B, S, per_layer=True), 0, self.plan)
            self.logits = m.logits(h.view(B, S, -1)[:, -1])
        finally:
            m.swap_comm(prev)
            m.prefill_schedule = prev_schedule


def comm_alone(comm, plan: TilePlan, sublayers: int, hidden: int, dtype, device) -> Callable[[], None]:
    """The prefill's all-reduces alone, back to back (every tile of every sublayer), no compute between them."""
    buf = torch.zeros(plan.rows, hidden, dtype=dtype, device=device)

    def run():
        handles = [comm.start(buf[r0:r1], i, (r0, r1)) for _ in range(sublayers) for i, (r0, r1) in
                   enumerate(plan.ranges)]
        comm.wait_all(handles)
    return capture_cuda(run) if device.type == "cuda" else run


def emulate_row(model: LlamaForCausalLM, comm, batch: int, seq: int, opts: BenchModelOptions) -> dict:
    """Every plan of one prompt shape with the stand-in, tiles=1 and auto with comm off, the comm alone."""
    device, s = model.device, model.shape
    ids = random_ids(model.config.vocab_size, batch, seq, opts.seed, device)
    plans = {"tiles1": model.plan_for(batch, seq, 1), "auto": model.plan_for(batch, seq, "auto")}
    plans.update({f"t{n}": model.plan_for(batch, seq, n) for n in opts.tile_counts})
    variants = {label: PrefillVariant(model, ids, p, comm) for label, p in plans.items()}
    off = NoComm(s.world_size, s.rank)
    variants.update({f"compute_{k}": PrefillVariant(model, ids, plans[k], off) for k in ("tiles1", "auto")})
    if device.type == "cuda" and plans["auto"].num_tiles > 1:  # what the wavefront schedule buys: auto on one stream
        variants["auto_one_stream"] = PrefillVariant(model, ids, plans["auto"], comm, "one")
        variants["compute_auto_one_stream"] = PrefillVariant(model, ids, plans["auto"], off, "one")
    fns: Dict[str, Callable] = {k: v.replay for k, v in variants.items()}
    sublayers = 2 * len(model.layers)
    for k in ("tiles1", "auto"):
        fns[f"comm_{k}"] = comm_alone(comm, plans[k], sublayers, s.hidden_size, model.dtype, device)
    ms = interleaved_median_ms(fns, device, opts.repeats, opts.warmup)
    same = plans["auto"] == plans["tiles1"]  # one plan timed twice: their ratio is noise, not a speedup
    local = slice(0, s.local_vocab)  # this rank's vocabulary: the emulated gather repeats it
    ref, auto = variants["tiles1"].logits[:, local].double(), variants["auto"].logits[:, local].double()
    last = plans["auto"].ranges[-1]
    exposed = 0.0 if comm.model is None else comm.model.allreduce_seconds(
        (last[1] - last[0]) * s.hidden_size * model.embed.weight.element_size(), s.world_size) * 1e3
    ceiling = max(ms["compute_auto"], ms["comm_auto"]) + exposed
    fixed = {k: ms[k] for k in plans if k.startswith("t") and k != "tiles1"}  # best fixed / auto: >= 1 is a loss
    return {"batch": batch, "seq": seq, "ms": ms, "plans": {k: list(p.bounds) for k, p in plans.items()},
            "auto_tiles": plans["auto"].num_tiles, "auto_is_tiles1": same,
            "speedup_auto": 1.0 if same else ms["tiles1"] / ms["auto"],
            "best_fixed": min(fixed, key=fixed.get) if fixed else None,
            "auto_vs_best_fixed": min(fixed.values()) / ms["auto"] if fixed else None,  # < 1: a fixed plan was faster
            "exposed_tile_ms": exposed, "ceiling_ms": ceiling, "ceiling_speedup": ms["tiles1"] / ceiling,
            "logits_rel_err": ((auto - ref).norm() / ref.norm()).item()}


def emulated_decode(model: LlamaForCausalLM, comm, batch: int, opts: BenchModelOptions, copy_gbps: float) -> dict:
    """Decode tokens/s after a ``decode_prompt`` prompt, against the bound: the bytes this rank reads per step
    over the copy rate, or the step's collectives times their modelled latency, whichever is longer."""
    ids = random_ids(model.config.vocab_size, batch, opts.decode_prompt, opts.seed, model.device)
    st = GenerateStats()
    for _ in range(2):  # the first run captures the graph and warms up
        model.generate(ids, opts.decode_tokens, stop_tokens=[], stats=st)
    s, elem = model.shape, model.embed.weight.element_size()
    kv_len = opts.decode_prompt + opts.decode_tokens // 2
    read_s = decode_bytes(model, batch, kv_len) / (copy_gbps * 1e9) if copy_gbps else 0.0
    comm_s = 0.0
    if comm.model is not None:  # two all-reduces per layer, the embedding's, the LM head's gather
        per_allreduce = comm.model.allreduce_seconds(batch * s.hidden_size * elem, s.world_size)
        comm_s = (2 * len(model.layers) + 1) * per_allreduce + \
            comm.model.allreduce_seconds(batch * s.local_vocab * 4 * s.world_size // 2, s.world_size)
    bound = batch / max(read_s, comm_s)
    return {"batch": batch, "prompt": opts.decode_prompt, "tokens_per_s": st.decode_tokens_per_s,
            "bound_tokens_per_s": bound, "share_of_bound": st.decode_tokens_per_s / bound,
            "bound_by": "memory" if read_s >= comm_s else "comm", "read_ms": read_s * 1e3, "comm_ms": comm_s * 1e3}


def emulate(rank: int, world: int, opts: BenchModelOptions) -> Optional[dict]:
    device, log = job_device(), log_on(rank)
    if torch.cuda.is_available() and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    comm = emulated_comm(opts, device)
    longest = max([s for _, s in opts.rows] + [opts.decode_prompt + opts.decode_tokens + 1])
    log(f"[bench-model] emulated rank 0 of TP={opts.emulate_tp}: {opts.label} shard, random weights, on {device}")
    model = build_model(opts, device, comm, max_seq_len=longest)
    res = {"model": opts.label, "emulate_tp": opts.emulate_tp, "device": str(device),
           "dtype": str(opts.dtype).replace("torch.", ""), "layers": len(model.layers),
           "weights": "random" if opts.model in SHAPES else "the checkpoint's",
           "comm": comm.model.describe() if comm.model is not None else "none (one rank)", "rows": [], "decode": []}
    res.update(peak_and_copy(device))
    with torch.no_grad():
        for batch, seq in opts.rows:
            log(f"[bench-model]   prefill {batch} x {seq}: plans tiles=1, auto, " +
                ", ".join(f"{n} tiles" for n in opts.tile_counts) + "; compute alone; comm alone")
            row = emulate_row(model, comm, batch, seq, opts)
            res["rows"].append(row)
            log(f"[bench-model]     tiles=1 {row['ms']['tiles1']:.2f} ms, auto ({row['auto_tiles']} tiles) "
                f"{row['ms']['auto']:.2f} ms: {row['speedup_auto']:.2f}x (ceiling {row['ceiling_speedup']:.2f}x)")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for batch in opts.decode_batches:
            log(f"[bench-model]   decode, batch {batch} after {opts.decode_prompt} tokens")
            res["decode"].append(emulated_decode(model, comm, batch, opts, res.get("copy_gbps", 0.0)))
    return res if rank == 0 else None


# -- the profile of a prefill -------------------------------------------------------------------------------
def profile_prefill(model: LlamaForCausalLM, ids: torch.Tensor, opts: BenchModelOptions):
    """Record the 1-tile and the tiled prefill (``repeats`` iterations each) on every rank; the gathered Profile on
    rank 0 (profiler/: the timeline, exposed comm per run)."""
    rec = SpanRecorder(model.shape.rank, ids.device)
    with torch.no_grad():
        for label, tiles in (("sequential", 1), ("tiled", "auto")):
            model(ids, tiles=tiles, last_only=True)  # warm
            rec.run = label
            for i in range(opts.repeats):
                rec.step = i
                barrier(ids.device)
                model.recorder = rec
                try:
                    model(ids, tiles=tiles, last_only=True)
                finally:
                    model.recorder = None
    meta = {"what": "TP model prefill", "device": str(ids.device), "attention_backend": model.attn_backend,
            "plan": list(model.last_plan.bounds), "num_tiles": model.last_plan.num_tiles,
            "describe": f"{opts.label} model, {model.config.num_hidden_layers} layers, prefill of "
                        f"{ids.shape[0]} x {ids.shape[1]} tokens"}
    return gather_profile(rec.spans(), estimate_clock_offsets(), meta)


# -- the long-context mode --------------------------------------------------------------------------------------
def resolve_context(model: LlamaForCausalLM, ctx, mode, steps: int) -> Tuple[int, Optional[dict]]:
    """A context of the table: a number as it is, or "max": the longest context both tiers hold in ``mode`` with
    this model's budgets, less the decode steps (computed from sizes: nothing is allocated to find it)."""
    if ctx != "max":
        return ctx, None
    rates = measure_rates(model.device) if mode != "off" else None
    cap = longest_context(mode, batch=1, sizing=model.kv_sizing(), device=model.device,
                          limit=model.config.max_position_embeddings, pcie_gbps=rates.pcie_gbps if rates else 0.0,
                          **model.kv_budgets())
    model.prefill_chunk = cap.prefill_chunk or None  # the chunk the capacity was computed for
    info = {"cache_tokens": cap.tokens, "bound_tokens": cap.bound_tokens, "share_of_bound": cap.share_of_bound,
            "prefill_chunk": cap.prefill_chunk, "gpu_tokens": cap.gpu_tokens}
    return cap.tokens - steps, info


def tier_shares(model: LlamaForCausalLM, timing: Optional[TierTiming], decode_s: float, ctx: int, steps: int) -> dict:
    """Measured busy time of each tier's attention over the decode steps, as shares of the decode time (the tiers run
    at once, so the shares overlap), and the rate decode read the host tier at."""
    c, plan = model.cache, model.kv_plan
    if timing is None or not plan.offloaded or decode_s <= 0:
        return {}
    host_tokens = sum(max(0, ctx + i - 1 - plan.gpu_tokens) for i in range(1, steps + 1))  # host keys read, all steps
    host_bytes = host_tokens * model.kv_bytes_per_token()
    return {"decode_share_measured": {"cpu_attention": timing.cpu_s / decode_s,
                                      "host_to_device_copies": c.stream.busy_seconds() / decode_s,
                                      "device_tier_attention": timing.device_seconds() / decode_s},
            "decode_host_read_gbps": host_bytes / decode_s / 1e9}


def context_run(model: LlamaForCausalLM, ctx, mode: str, opts: BenchModelOptions, log) -> dict:
    """One context in one KV offload mode: prefill, then ``decode_tokens`` steps; a row with its error when the
    mode cannot run at that context (refused by the plan before any large allocation, or out of memory)."""
    run, device, steps = {"context": ctx, "kv_offload": mode}, model.device, opts.decode_tokens
    model.drop_cache()
    model.kv_plan, model.prefill_chunk = None, None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model.kv_offload = int(mode) if mode not in ("auto", "off") else mode
    st, timing = GenerateStats(), TierTiming()
    try:
        ctx, cap = resolve_context(model, ctx, model.kv_offload, steps)
        run.update(context=ctx, **({"context_max": cap} if cap else {}))
        log(f"[bench-model] context {ctx}, kv offload {mode}" + (" (the longest both tiers hold)" if cap else ""))
        ids = random_ids(model.config.vocab_size, 1, ctx, 0, "cpu")  # moved by generate, after the plan: a capacity
        model.max_seq_len = ctx + steps                                # computed to the token sees no allocation first
        model.reset_cache(1, ctx + steps)  # the plan: a cache that cannot fit is refused here, before allocating
        if isinstance(model.cache, TieredKVCache):
            model.cache.timing = timing
        model.generate(ids, steps, stop_tokens=[], stats=st)
    except (ValueError, torch.OutOfMemoryError) as e:
        run["error"] = f"{type(e).__name__}: {e}"[:400]
        log(f"[bench-model]   does not run: {run['error']}")
        model.drop_cache()
        return run
    sync(device)
    plan, c = model.kv_plan, model.cache
    run.update(prefill_tokens_per_s=st.prefill_tokens_per_s, decode_tokens_per_s=st.decode_tokens_per_s,
               prefill_s=st.prefill_s, decode_s=st.decode_s, kv_plan=plan.describe(), gpu_tokens=plan.gpu_tokens,
               kv_device_gib=(c.gpu_bytes if hasattr(c, "gpu_bytes") else c.nbytes) / (1 << 30),
               kv_host_gib=getattr(c, "host_bytes", 0) / (1 << 30), prefill_chunk=min(plan.prefill_chunk or ctx, ctx),
               decode_host=plan.decode_host if plan.offloaded else None,
               decode_cpu_share=plan.decode_cpu_share if plan.offloaded else None, rates=vars(plan.rates),
               pcie_gbps=plan.pcie_gbps or None, cpu_gbps=plan.cpu_gbps or None)
    run.update(tier_shares(model, timing if plan.offloaded else None, st.decode_s, ctx, st.decode_steps))
    log(f"[bench-model]   prefill {run['prefill_tokens_per_s']:.0f} tokens/s, decode "
        f"{run['decode_tokens_per_s']:.2f} tokens/s; {run['kv_plan']}")
    model.drop_cache()
    return run


def long_context(rank: int, world: int, opts: BenchModelOptions) -> Optional[dict]:
    """Each context (or "max") in each KV offload mode: tokens/s, the KV split between the tiers, how decode read the
    host tier and each tier's share of its time; the longest context the device alone holds; the budgets."""
    device, log = job_device(), log_on(rank)
    numeric = [c for c in opts.contexts if c != "max"] or [1024]
    model = build_model(opts, device, max_seq_len=max(numeric) + opts.decode_tokens + 1)
    # Untimed, before the budgets apply: each path once at a short context (kernel compiles, cuDNN plans, the rates
    # the plan measures, the first pinned allocations), the offloaded one with half of it on the host.
    warm_ctx = min(numeric + [512])
    warm_ids = random_ids(model.config.vocab_size, 1, warm_ctx, 1, device)
    for mode in dict.fromkeys("off" if m == "off" else max(1, warm_ctx // 2) for m in opts.kv_offload):
        model.drop_cache()
        model.kv_plan, model.kv_offload, model.max_seq_len = None, mode, warm_ctx + 3
        model.generate(warm_ids, 2, stop_tokens=[])
    model.drop_cache()
    # The default host budget is a share of the memory available *now*: fixed once here, so that --context max is
    # planned and then decided against the same bytes (the available memory moves between the two).
    host_gb = opts.host_budget_gb if opts.host_budget_gb is not None else default_host_budget() / GIB
    model.host_budget_gb, model.gpu_budget_gb = host_gb, opts.gpu_budget_gb
    budgets = model.kv_budgets()
    res = {"model": opts.label, "world": world, "device": str(device), "runs": [], "gpu_budget_gb": opts.gpu_budget_gb,
           "host_budget_gib": host_gb}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        res["device_free_gib"] = device_free_bytes(device, budgets["gpu_budget_bytes"]) / GIB
        res["longest_without_offload"] = longest_context("off", batch=1, sizing=model.kv_sizing(), device=device,
                                                         limit=model.config.max_position_embeddings, **budgets).tokens
    with torch.no_grad():
        res["runs"] = [context_run(model, ctx, mode, opts, log) for ctx in opts.contexts for mode in opts.kv_offload]
    return res if rank == 0 else None


def bench_model_rank(rank: int, world: int, opts: BenchModelOptions) -> Optional[dict]:
    """What every rank runs: the mode ``opts`` asks for (module docstring)."""
    if opts.emulate_tp:
        return emulate(rank, world, opts)
    if opts.contexts:
        return long_context(rank, world, opts)
    return standard(rank, world, opts)


# -- tune --model: plans measured on a slice of the model ----------------------------------------------------
# A slice's gain from tiling overstated the whole model's by up to 7% on an H200, most at 32K
# (docs/model_emulation.md), so a tiled plan is stored only when it beats one tile by a clear margin.
SLICE_MARGIN = 0.05


def pick_tuned(ms: dict) -> int:
    """The tile count to store from a slice's times ``ms`` (tile count -> ms; 1 present): the fastest, unless it
    is within SLICE_MARGIN of one tile, where one tile is kept (it cannot lose to tiles=1)."""
    best = min(ms, key=ms.get)
    return best if ms[best] < ms[1] * (1 - SLICE_MARGIN) else 1


def tune_model(rank: int, world: int, opts: BenchModelOptions) -> Optional[dict]:
    """For each (batch, seq) of ``opts.rows``: every plan of 1..max(tile_counts) tiles timed as a whole prefill
    (time to first token) of a slice of ``opts.layers`` layers, with the comm path the model will run (the
    stand-in when emulating); the entries the tuned profile stores (tuning/measured.py), keyed so the whole
    model finds them."""
    device, log = job_device(), log_on(rank)
    if torch.cuda.is_available() and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    comm = emulated_comm(opts, device) if opts.emulate_tp else "nccl"
    model = build_model(opts, device, comm, max_seq_len=max(s for _, s in opts.rows))
    entries = {}
    with torch.no_grad():
        for batch, seq in opts.rows:
            ids = random_ids(model.config.vocab_size, batch, seq, opts.seed, device)
            plans = {n: model.plan_for(batch, seq, n) for n in range(1, max(opts.tile_counts) + 1)}
            plans = {n: p for n, p in plans.items() if n == 1 or p.num_tiles == n}
            variants = {n: PrefillVariant(model, ids, p, model.comm) for n, p in plans.items()}
            ms = interleaved_median_ms({n: v.replay for n, v in variants.items()}, device, opts.repeats, opts.warmup)
            best = pick_tuned(ms)
            entries[model.tuned_key(batch, seq)] = {"plans": [{"bounds": list(plans[n].bounds), "ms": ms[n]}
                                                              for n in plans], "best": list(plans[best].bounds),
                                                    "layers": len(model.layers)}
            log(f"[tune] {opts.label} {batch} x {seq}: " + ", ".join(f"{n} tiles {ms[n]:.2f} ms" for n in plans) +
                f" ({len(model.layers)} layers): best {best}")
            del variants
    return entries if rank == 0 else None
