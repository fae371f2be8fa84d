"""The block workload ``demo`` and ``profile`` run: its configuration and its inputs.

``BlockConfig.validate`` catches every bad value before a rank starts (the CLI's one-line errors);
``make_inputs`` builds the same full weights and input on every rank from a fixed seed, so each rank
keeps its shard and rank 0 can compute the float64 reference; ``start_rank`` is what a rank of
``demo`` or ``profile`` starts from (the block, its input and its tile plan).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..attention import available
from ..block import TPAttention, check_tiles
from ..masks import Mask, resolve_mask
from ..parallel.link_models import LinkModel
from ..parallel.sharding import TPShape
from ..parallel.tile_plan import TilePlan
from ..runner import Launch, job_device, launch_world_size
from .options import parse_dtype

@dataclass
class BlockConfig:
    """One demo or profile job: the block's shape, how it runs, the simulated link, the timing and checks."""

    world_size: int = 2
    # the shape: batch x seq tokens of width hidden; heads query heads share kv_heads key/value heads
    batch: int = 1
    seq: int = 1024
    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 4
    # how it runs: the tile plan ("auto": the cost model's or a tuned one), the mask, the kernel and precision
    tiles: object = "auto"
    mask: str = "causal"
    dtype: str = "float32"
    attn_backend: str = "auto"
    attn_precision: str = "bf16"
    # Default link: the CPU computes roughly 5000x slower than an H200, so NVLink's ~250 GB/s is scaled
    # down alike: comm then costs about what attention + o_proj cost (docs/tiling.md, the simulated link).
    link_latency_us: float = 50.0
    link_gbps: Optional[float] = 0.08
    rope_theta: Optional[float] = 10000.0
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    check: bool = True
    check_inputs: bool = True
    verbose: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args, launch: Launch) -> "BlockConfig":
        """The config of ``demo``/``profile``'s options, every value checked (the launcher's world size too)."""
        cfg = cls(world_size=launch_world_size(launch), batch=args.batch, seq=args.seq, hidden=args.hidden,
                  heads=args.heads, kv_heads=args.kv_heads, tiles=args.tiles, mask=args.mask, dtype=args.dtype,
                  attn_backend=args.attn_backend, attn_precision=args.attn_precision,
                  link_latency_us=0.0 if args.no_link else args.link_latency_us,
                  link_gbps=None if args.no_link else args.link_gbps,
                  rope_theta=None if args.no_rope else 10000.0, warmup=args.warmup, repeats=args.repeats,
                  seed=args.seed, check=not getattr(args, "no_check", False),
                  verbose=not getattr(args, "json", False))
        cfg.validate(launch.device_type())
        return cfg

    def validate(self, device_type: str = "cpu") -> None:
        """Every value, as the ranks would check it, so a bad one fails once, before any rank starts."""
        for name in ("world_size", "batch", "seq", "hidden", "heads", "kv_heads", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an int >= 1, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        self.tiles = check_tiles(self.tiles)
        resolve_mask(self.mask).validate(self.batch, self.seq)
        parse_dtype(self.dtype)
        why = available(self.attn_backend, torch.device(device_type), self.attn_precision)
        if why:
            raise ValueError(why)
        if self.rope_theta is not None and not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope theta must be a finite number > 0, got {self.rope_theta}")
        self.link()  # validates latency and bandwidth
        self.check_shape(self.world_size)

    def check_shape(self, world_size: int) -> None:
        """Shape errors (the same ValueError every rank would raise)."""
        self.world_size = world_size
        shape = TPShape.checked(self.hidden, self.heads, self.kv_heads, world_size, 0)
        if self.rope_theta is not None and shape.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {shape.head_dim} "
                             f"(hidden {self.hidden} / {self.heads} heads); use --no-rope or another shape")

    def link(self) -> Optional[LinkModel]:
        if not self.link_latency_us and self.link_gbps is None:
            return None
        return LinkModel(self.link_latency_us or 0.0, self.link_gbps if self.link_gbps is not None else float("inf"))

    def describe(self) -> str:
        link = self.link()
        lk = f"link {link.latency_us:g} us + {link.gbps:g} GB/s" if link else "no link model"
        return (f"batch {self.batch} x seq {self.seq}, hidden {self.hidden}, {self.heads} heads / "
                f"{self.kv_heads} kv heads, {self.dtype}, mask {self.mask}, {lk}"
                + ("" if self.attn_precision == "bf16" else f", {self.attn_precision} attention"))


def make_inputs(cfg: BlockConfig, device: torch.device):
    """Full weights (nn.Linear layout) and the input, identical on every rank (fixed seed, made on CPU)."""
    g = torch.Generator().manual_seed(cfg.seed)
    H, D = cfg.hidden, cfg.hidden // cfg.heads
    scale = H ** -0.5
    wq = torch.randn(cfg.heads * D, H, generator=g) * scale
    wk = torch.randn(cfg.kv_heads * D, H, generator=g) * scale
    wv = torch.randn(cfg.kv_heads * D, H, generator=g) * scale
    wo = torch.randn(H, cfg.heads * D, generator=g) * scale
    x = torch.randn(cfg.batch, cfg.seq, H, generator=g)
    dt = parse_dtype(cfg.dtype)
    return [w.to(device=device, dtype=dt) for w in (wq, wk, wv, wo)], x.to(device=device, dtype=dt)


def build_block(cfg: BlockConfig, device: torch.device):
    """The block of ``cfg`` on ``device`` with the workload's weights loaded; returns (block, x, full weights)."""
    block = TPAttention(cfg.hidden, cfg.heads, cfg.kv_heads, tiles=cfg.tiles, dtype=parse_dtype(cfg.dtype),
                        device=device, rope_theta=cfg.rope_theta, backend=cfg.attn_backend, link=cfg.link(),
                        check_inputs=cfg.check_inputs, attn_precision=cfg.attn_precision)
    weights, x = make_inputs(cfg, device)
    block.load_full_weights(*weights)
    return block, x, weights


@dataclass
class RankWork:
    """What every rank of ``demo`` and ``profile`` starts from (``start_rank``)."""

    device: torch.device
    log: Optional[Callable[[str], None]]  # prints on rank 0 (stderr) when the config is verbose, else None
    mask: Mask
    block: TPAttention
    x: torch.Tensor
    weights: list
    plan: TilePlan


def start_rank(cfg: BlockConfig, rank: int, world_size: int, label: str) -> RankWork:
    """Build the block of ``cfg`` on this rank's device, with its input and tile plan; say so on rank 0."""
    device = job_device()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if (cfg.verbose and rank == 0) else None
    mask = resolve_mask(cfg.mask)
    block, x, weights = build_block(cfg, device)
    plan = block.plan_for(cfg.batch, cfg.seq, mask)
    if log:
        log(f"[{label}] {world_size} ranks, {cfg.describe()}")
        log(f"[{label}] tile plan ({cfg.tiles}): {plan.num_tiles} tiles, rows {list(plan.bounds)}")
    return RankWork(device, log, mask, block, x, weights, plan)
