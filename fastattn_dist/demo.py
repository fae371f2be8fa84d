"""The main job: one TP attention block, run sequentially and with tiling-AllReduce, checked and timed.

``run_rank`` is what every rank executes (spawned locally, or under torchrun / mpirun); rank 0's
return value carries the summary. Weights and input come from a fixed seed, so every rank builds
the same full weights and keeps its shard, and rank 0 can compute the float64 reference.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from .block import TPAttention, check_tiles
from .config import LinkModel
from .masks import resolve_mask
from .reference_block import reference_block

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


@dataclass
class DemoConfig:
    world_size: int = 2
    batch: int = 1
    seq: int = 1024
    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 4
    tiles: object = "auto"
    mask: str = "causal"
    dtype: str = "float32"
    backend: str = "auto"
    # Default link: the CPU computes roughly 5000x slower than an H200, so NVLink's ~250 GB/s is scaled
    # down alike; comm then costs about what attention + o_proj cost, as in NOTES.md's GPU figures.
    link_latency_us: float = 50.0
    link_gbps: Optional[float] = 0.08
    rope_theta: Optional[float] = 10000.0
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    check: bool = True
    verbose: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("world_size", "batch", "seq", "hidden", "heads", "kv_heads", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an int >= 1, got {v!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        self.tiles = check_tiles(self.tiles)
        resolve_mask(self.mask)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(set(DTYPES))}")
        self.link()  # validates latency and bandwidth

    def link(self) -> Optional[LinkModel]:
        if not self.link_latency_us and self.link_gbps is None:
            return None
        return LinkModel(self.link_latency_us or 0.0, self.link_gbps if self.link_gbps is not None else float("inf"))

    def describe(self) -> str:
        link = self.link()
        lk = f"link {link.latency_us:g} us + {link.gbps:g} GB/s" if link else "no link model"
        return (f"batch {self.batch} x seq {self.seq}, hidden {self.hidden}, {self.heads} heads / "
                f"{self.kv_heads} kv heads, {self.dtype}, mask {self.mask}, {lk}")


def make_inputs(cfg: DemoConfig, device: torch.device):
    """Full weights (nn.Linear layout) and the input, identical on every rank (fixed seed, made on CPU)."""
    g = torch.Generator().manual_seed(cfg.seed)
    H, D = cfg.hidden, cfg.hidden // cfg.heads
    scale = H ** -0.5
    wq = torch.randn(cfg.heads * D, H, generator=g) * scale
    wk = torch.randn(cfg.kv_heads * D, H, generator=g) * scale
    wv = torch.randn(cfg.kv_heads * D, H, generator=g) * scale
    wo = torch.randn(H, cfg.heads * D, generator=g) * scale
    x = torch.randn(cfg.batch, cfg.seq, H, generator=g)
    dt = DTYPES[cfg.dtype]
    return [w.to(device=device, dtype=dt) for w in (wq, wk, wv, wo)], x.to(device=device, dtype=dt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _barrier(device: torch.device) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        _max_over_ranks(0.0, device)  # an all-reduce as barrier: works on gloo and NCCL alike


def time_block(block: TPAttention, x, mask, tiles, device, warmup: int, repeats: int, log=None) -> list:
    """Per-repeat block time in ms, the max over ranks (the block is done when the slowest rank is)."""
    for _ in range(warmup):
        block(x, mask=mask, tiles=tiles)
    times = []
    for i in range(repeats):
        _barrier(device)
        _sync(device)
        t0 = time.perf_counter()
        block(x, mask=mask, tiles=tiles)
        _sync(device)
        times.append(_max_over_ranks((time.perf_counter() - t0) * 1e3, device))
        if log:
            log(f"  {i + 1}/{repeats}: {times[-1]:.2f} ms")
    return times


def exposed_comm_ms(block: TPAttention, x, mask, tiles) -> tuple:
    """One recorded run: (block ms, compute ms, exposed comm ms) on this rank."""
    from .profiler.recorder import SpanRecorder

    rec = SpanRecorder(block.rank, x.device)
    block.recorder = rec
    try:
        block(x, mask=mask, tiles=tiles)
    finally:
        block.recorder = None
    spans = rec.spans()
    blk = next(s for s in spans if s.name == "block")
    compute = sum(s.dur_us for s in spans if s.lane == "compute")
    return blk.dur_us / 1e3, compute / 1e3, max(0.0, blk.dur_us - compute) / 1e3


def run_rank(rank: int, world_size: int, cfg: DemoConfig) -> dict:
    """Everything one rank does for the demo. Needs the process group initialised (any launcher)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if (cfg.verbose and rank == 0) else None
    mask = resolve_mask(cfg.mask)
    block = TPAttention(cfg.hidden, cfg.heads, cfg.kv_heads, tiles=cfg.tiles, dtype=DTYPES[cfg.dtype],
                        device=device, rope_theta=cfg.rope_theta, backend=cfg.backend, link=cfg.link())
    weights, x = make_inputs(cfg, device)
    block.load_full_weights(*weights)
    plan = block.plan_for(cfg.batch, cfg.seq, mask)
    if log:
        log(f"[demo] {world_size} ranks, {cfg.describe()}")
        log(f"[demo] tile plan ({cfg.tiles}): {plan.num_tiles} tiles, rows {list(plan.bounds)}")
    results = {}
    outputs = {}
    for name, tiles in (("sequential", 1), ("tiled", cfg.tiles)):
        if log:
            log(f"[demo] timing {name} ({cfg.warmup} warm-up, {cfg.repeats} timed)")
        outputs[name] = block(x, mask=mask, tiles=tiles).clone()
        times = time_block(block, x, mask, tiles, device, cfg.warmup, cfg.repeats)
        blk_ms, compute_ms, exposed_ms = exposed_comm_ms(block, x, mask, tiles)
        results[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times,
                         "compute_ms": _max_over_ranks(compute_ms, device),
                         "exposed_comm_ms": _max_over_ranks(exposed_ms, device)}
    summary = {
        "world_size": world_size, "backend": dist.get_backend(), "device": str(device),
        "attention_backend": block.backend, "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "plan": list(plan.bounds), "num_tiles": plan.num_tiles,
        "sequential_ms": results["sequential"]["median_ms"], "tiled_ms": results["tiled"]["median_ms"],
        "speedup": results["sequential"]["median_ms"] / results["tiled"]["median_ms"],
        "sequential_exposed_comm_ms": results["sequential"]["exposed_comm_ms"],
        "tiled_exposed_comm_ms": results["tiled"]["exposed_comm_ms"],
        "sequential_compute_ms": results["sequential"]["compute_ms"],
        "tiled_compute_ms": results["tiled"]["compute_ms"],
        "runs": results,
    }
    tiled_vs_seq = (outputs["tiled"].double() - outputs["sequential"].double()).abs().max().item()
    summary["tiled_vs_sequential_max_abs"] = tiled_vs_seq
    if cfg.check and rank == 0:
        ref = reference_block(x.cpu(), *[w.cpu() for w in weights], cfg.heads, cfg.kv_heads, mask=mask,
                              rope_theta=cfg.rope_theta)
        scale = ref.abs().max().item()
        for name, out in outputs.items():
            summary[f"{name}_max_rel_err"] = (out.cpu().double() - ref).abs().max().item() / scale
        summary["max_rel_err"] = max(summary["sequential_max_rel_err"], summary["tiled_max_rel_err"])
    return summary


def format_table(s: dict) -> str:
    rows = [("run", "tiles", "median ms", "exposed comm ms", "speedup", "max rel err vs fp64")]
    for name, tiles in (("sequential", 1), ("tiled", s["num_tiles"])):
        err = s.get(f"{name}_max_rel_err")
        rows.append((name, str(tiles), f"{s[name + '_ms']:.2f}", f"{s[name + '_exposed_comm_ms']:.2f}",
                     f"{s['sequential_ms'] / s[name + '_ms']:.2f}x", "-" if err is None else f"{err:.2e}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
