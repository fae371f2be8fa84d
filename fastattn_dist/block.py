"""TPAttention: the tensor-parallel attention + o_proj block with tiling-AllReduce.

QKV are column-parallel and O row-parallel over the process group; ``forward`` takes the
replicated ``[batch, seq, hidden]`` input and returns the full output on every rank. The QKV
projection runs once over all rows; then, tile by tile, attention -> o_proj partial sum -> an
asynchronous all-reduce of the tile's output rows, overlapping the next tile's compute.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .attention import resolve_backend
from .config import LinkModel, TilePlanOptions
from .masks import MaskLike, resolve_mask
from .attention import run_backend
from .parallel.graphs import CapturedCall, capture_cuda, run_eagerly
from .parallel.ce_allreduce import CopyEngineAllReduce, copy_engine_available
from .parallel.link import AllReduceStream
from .parallel.sharding import TPShape, shard_full_weights
from .parallel.tiling_allreduce import TilePlan, run_pipeline, tile_segments
from .tuning import BlockCost, DeviceProfile, choose_plan, fixed_plan, profile_for

Tiles = Union[int, str]


def check_tiles(tiles) -> Tiles:
    """``tiles`` is an int >= 1 or "auto"."""
    if isinstance(tiles, str):
        if tiles != "auto":
            raise ValueError(f"tiles must be an int >= 1 or 'auto', got {tiles!r}")
        return tiles
    if isinstance(tiles, bool) or not isinstance(tiles, int):
        raise TypeError(f"tiles must be an int >= 1 or 'auto', got {type(tiles).__name__}")
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    return tiles


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half form, positions 0..S-1) on ``[B, S, H, D]``."""
    S, D = x.shape[1], x.shape[3]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.outer(torch.arange(S, device=x.device, dtype=torch.float32), inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    rotated = torch.cat([-x2, x1], -1)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(cdt) * cos.to(cdt) + rotated.to(cdt) * sin.to(cdt)).to(x.dtype)


class TPAttention(nn.Module):
    """Tensor-parallel attention block; see the module docstring.

    ``tiles``: tile count of the tiling-AllReduce, or "auto" (cost model in tuning.py); 1 is the
    sequential block. ``group``: the process group (default: the world group; a single process
    without torch.distributed runs as world size 1). ``link``: a simulated link (CPU study).
    ``backend``: attention backend (see ``fastattn_dist.attention``).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 tiles: Tiles = "auto", group=None, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, rope_theta: Optional[float] = None,
                 backend: str = "auto", link: Optional[LinkModel] = None,
                 profile: Optional[DeviceProfile] = None, plan_options: TilePlanOptions = TilePlanOptions(),
                 cuda_graph: bool = False, comm: str = "nccl"):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(group), dist.get_rank(group)
        else:
            if group is not None:
                raise ValueError("a process group was given but torch.distributed is not initialised")
            world, rank = 1, 0
        self.shape = TPShape.checked(hidden_size, num_heads, num_kv_heads, world, rank)
        self.tiles = check_tiles(tiles)
        if rope_theta is not None and not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number or None, got {rope_theta!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if link is not None and not isinstance(link, LinkModel):
            raise TypeError(f"link must be a LinkModel, got {type(link).__name__}")
        if comm not in ("nccl", "copy_engine"):
            raise ValueError(f"comm must be 'nccl' (the process group's all-reduce) or 'copy_engine', got {comm!r}")
        self.comm = comm
        self.rope_theta = rope_theta
        self.group = group
        self.link = link
        self.plan_options = plan_options
        self._profile = profile
        s = self.shape
        D = s.head_dim
        kw = {"dtype": dtype, "device": device, "bias": False}
        self.q_proj = nn.Linear(hidden_size, s.local_heads * D, **kw)
        self.k_proj = nn.Linear(hidden_size, s.local_kv_heads * D, **kw)
        self.v_proj = nn.Linear(hidden_size, s.local_kv_heads * D, **kw)
        self.o_proj = nn.Linear(s.local_heads * D, hidden_size, **kw)
        self.backend = resolve_backend(backend, self.o_proj.weight.device)
        self.recorder = None  # a profiler.SpanRecorder, or None (off: costs nothing)
        self.last_plan: Optional[TilePlan] = None
        self._comm: Optional[AllReduceStream] = None
        self._plan_cache: dict = {}
        # Replay the tiled part as one CUDA graph per input shape; the returned output buffer is reused
        # by the next call of that shape. On CPU the same path runs eagerly on the static buffers.
        self.cuda_graph = bool(cuda_graph)
        self._graph_capture = capture_cuda if self.o_proj.weight.device.type == "cuda" else run_eagerly
        self._graphs: dict = {}

    @property
    def world_size(self) -> int:
        return self.shape.world_size

    @property
    def rank(self) -> int:
        return self.shape.rank

    @torch.no_grad()
    def load_full_weights(self, wq, wk, wv, wo) -> None:
        """Take unsharded ``nn.Linear``-layout weights (``[out, in]``) and keep this rank's shard."""
        shards = shard_full_weights(self.shape, wq, wk, wv, wo)
        for name, lin in (("wq", self.q_proj), ("wk", self.k_proj), ("wv", self.v_proj), ("wo", self.o_proj)):
            lin.weight.copy_(shards[name].to(device=lin.weight.device, dtype=lin.weight.dtype))

    # -- tile plan -------------------------------------------------------------
    @property
    def profile(self) -> DeviceProfile:
        return self._profile or profile_for(self.o_proj.weight.device)

    def plan_for(self, batch: int, seq: int, mask: MaskLike = "causal", tiles: Optional[Tiles] = None) -> TilePlan:
        """The tile plan ``forward`` uses for this input shape and mask."""
        m = resolve_mask(mask)
        tiles = self.tiles if tiles is None else check_tiles(tiles)
        key = (batch, seq, m.describe(), tiles)
        plan = self._plan_cache.get(key)
        if plan is None:
            s = self.shape
            cost = BlockCost(batch, seq, s.hidden_size, s.local_heads, s.head_dim, s.world_size,
                             self.o_proj.weight.element_size())
            if tiles == "auto":
                plan = choose_plan(cost, m, profile=self.profile, link=self.link, options=self.plan_options).plan
            else:
                plan = fixed_plan(cost, m, tiles, profile=self.profile, options=self.plan_options)
            self._plan_cache[key] = plan
        return plan

    # -- forward ---------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        w = self.o_proj.weight
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.shape.hidden_size:
            raise ValueError(f"x must have shape [batch, seq, {self.shape.hidden_size}], got {list(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"x is empty: shape {list(x.shape)}")
        if x.dtype != w.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the block's weights are {w.dtype}")
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the block's weights are on {w.device}")

    def _comm_stream(self):
        if self._comm is None:
            device = self.o_proj.weight.device
            if self.comm == "copy_engine" and copy_engine_available(device, self.group):
                self._comm = CopyEngineAllReduce(self.group, device)
            else:  # the process group's own all-reduce (also where copy engines are not available: CPU)
                self._comm = AllReduceStream(self.group, self.link, device)
        return self._comm

    @torch.no_grad()
    def forward(self, x: torch.Tensor, mask: MaskLike = "causal", tiles: Optional[Tiles] = None) -> torch.Tensor:
        """``x``: ``[batch, seq, hidden]``, the same on every rank. Returns the all-reduced output."""
        self._check_input(x)
        m = resolve_mask(mask)
        m.validate(x.shape[0], x.shape[1])
        rec = self.recorder
        if rec is not None:
            block_tok = rec.begin("block", -1, lane="block")
            tok = rec.begin("qkv", -1)
        q, k, v = self.project_qkv(x)
        if rec is not None:
            rec.end(tok)
        y = self._attend(q, k, v, m, tiles)
        if rec is not None:
            rec.end(block_tok)
        return y

    def project_qkv(self, x: torch.Tensor):
        """This rank's q ``[B, S, local_heads, D]`` and k, v ``[B, S, local_kv_heads, D]`` (RoPE applied)."""
        B, S, _ = x.shape
        s = self.shape
        q = self.q_proj(x).view(B, S, s.local_heads, s.head_dim)
        k = self.k_proj(x).view(B, S, s.local_kv_heads, s.head_dim)
        v = self.v_proj(x).view(B, S, s.local_kv_heads, s.head_dim)
        if self.rope_theta is not None:
            q, k = rope(q, self.rope_theta), rope(k, self.rope_theta)
        return q, k, v

    @torch.no_grad()
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike = "causal",
               tiles: Optional[Tiles] = None) -> torch.Tensor:
        """Attention -> o_proj -> all-reduce, tiled, from this rank's projected q, k, v (``project_qkv``'s layout)."""
        s = self.shape
        w = self.o_proj.weight
        for name, t, heads in (("q", q, s.local_heads), ("k", k, s.local_kv_heads), ("v", v, s.local_kv_heads)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[2:] != (heads, s.head_dim):
                raise ValueError(f"{name} must be [batch, seq, {heads}, {s.head_dim}] (this rank's heads), "
                                 f"got {list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.dtype != w.dtype or t.device != w.device:
                raise TypeError(f"{name} must be {w.dtype} on {w.device}, got {t.dtype} on {t.device}")
        if k.shape[:2] != q.shape[:2] or v.shape != k.shape or q.shape[0] < 1 or q.shape[1] < 1:
            raise ValueError(f"q, k, v must share a non-empty [batch, seq], got {list(q.shape)}, {list(k.shape)}, "
                             f"{list(v.shape)}")
        m = resolve_mask(mask)
        m.validate(q.shape[0], q.shape[1])
        return self._attend(q, k, v, m, tiles)

    def _attend(self, q, k, v, m, tiles) -> torch.Tensor:
        B, S = q.shape[:2]
        plan = self.plan_for(B, S, m, tiles)
        self.last_plan = plan
        if self.cuda_graph and self.recorder is None:
            key = (B, S, m.describe(), plan.bounds)
            call = self._graphs.get(key)
            if call is None:
                fn = lambda q_, k_, v_, out: self._run_tiles(q_, k_, v_, m, plan, out)
                call = CapturedCall(fn, (q, k, v), (B, S, self.shape.hidden_size), self._graph_capture)
                self._graphs[key] = call
            return call(q, k, v)
        out = torch.empty(B, S, self.shape.hidden_size, dtype=q.dtype, device=q.device)
        return self._run_tiles(q, k, v, m, plan, out)

    def _scratch(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """The o_proj input buffer, allocated once per shape and reused (never returned to the user)."""
        buf = getattr(self, "_attn_buf", None)
        if buf is None or buf.shape != (rows, cols) or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
            self._attn_buf = buf
        return buf

    def _run_tiles(self, q, k, v, m, plan: TilePlan, out: torch.Tensor) -> torch.Tensor:
        B, S, Hl, D = q.shape
        H = self.shape.hidden_size
        rec = self.recorder
        comm = self._comm_stream()
        comm.enable_timing(rec is not None)
        attn_buf = self._scratch(B * S, Hl * D, q)
        partials = comm.prepare(out.view(B * S, H))  # where o_proj writes: out, or a symmetric buffer
        w_o = self.o_proj.weight

        def compute_tile(i: int, r0: int, r1: int) -> torch.Tensor:
            if rec is not None:
                t = rec.begin("attention", i)
            for b0, b1, s0, s1 in tile_segments(r0, r1, S):
                dst = attn_buf[b0 * S + s0: (b1 - 1) * S + s1].view(b1 - b0, s1 - s0, Hl, D)
                run_backend(self.backend, q[b0:b1, s0:s1], k[b0:b1], v[b0:b1], m.slice_batch(b0, b1),
                            q_offset=s0, out=dst)
            if rec is not None:
                rec.end(t)
                t = rec.begin("o_proj", i)
            piece = partials[r0:r1]
            torch.matmul(attn_buf[r0:r1], w_o.t(), out=piece)
            if rec is not None:
                rec.end(t)
            return piece

        handles = run_pipeline(plan, compute_tile, comm)
        if rec is not None:
            rec.comm(handles)
        return out

    def extra_repr(self) -> str:
        s = self.shape
        return (f"hidden={s.hidden_size}, heads={s.num_heads}, kv_heads={s.num_kv_heads}, "
                f"tp={s.world_size}, rank={s.rank}, tiles={self.tiles}, backend={self.backend}")
