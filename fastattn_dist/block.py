"""TPAttention: the tensor-parallel attention + o_proj block with tiling-AllReduce.

QKV are column-parallel and O row-parallel over the process group; ``forward`` takes the
replicated ``[batch, seq, hidden]`` input and returns the full output on every rank. The QKV
projection runs once over all rows; then, tile by tile, attention -> o_proj partial sum -> an
asynchronous all-reduce of the tile's output rows, overlapping the next tile's compute
(``parallel/row_parallel.py``: the o_proj and its tiles; ``parallel/comm.py``: the all-reduce paths).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from .attention import available, kernel_for, resolve_backend, run_kernel
from .config import LinkModel, TilePlanOptions
from .lru import LRUCache
from .masks import Mask, MaskLike, resolve_mask
from .parallel.ce_allreduce import copy_engine_available
from .parallel.comm import COMM_PATHS, group_world_rank, make_comm
from .parallel.graphs import CapturedCall, capture_cuda, run_eagerly
from .parallel.row_parallel import TILE_STREAMS, TiledRowParallelLinear
from .parallel.sharding import TPShape, shard_full_weights
from .parallel.tiling_allreduce import TilePlan, tile_segments
from .profiler.recorder import BLOCK, span
from .rope import Rotary
from .tuning import BlockCost, CommOption, DeviceProfile, choose, profile_for, tile_streams_for

Tiles = Union[int, str, TilePlan]
MAX_GRAPHS = 8   # captured graphs kept (each holds its inputs, output and private memory)
MAX_PLANS = 64


def check_tiles(tiles) -> Tiles:
    """``tiles`` is an int >= 1, "auto", or an explicit ``TilePlan`` (checked against the rows per call)."""
    if isinstance(tiles, TilePlan):
        return tiles
    if isinstance(tiles, str):
        if tiles != "auto":
            raise ValueError(f"tiles must be an int >= 1 or 'auto', got {tiles!r}")
        return tiles
    if isinstance(tiles, bool) or not isinstance(tiles, int):
        raise TypeError(f"tiles must be an int >= 1 or 'auto', got {type(tiles).__name__}")
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    return tiles


class TPAttention(nn.Module):
    """Tensor-parallel attention block; see the module docstring.

    ``tiles``: tile count of the tiling-AllReduce, or "auto" (cost model in tuning.py); 1 is the
    sequential block. ``group``: the process group (default: the world group; a single process
    without torch.distributed runs as world size 1). ``comm``: "nccl" (the process group's all-reduce;
    gloo on CPU), "copy_engine" (symmetric memory, one node of GPUs), "auto" (per input shape, the
    path the cost model predicts fastest), a comm object such as ``parallel.standin.StandInAllReduce(4)``,
    which makes this process rank 0 of an emulated TP=4 group on one GPU, or a dict of comm objects
    to choose from per shape. ``link``: a simulated link for CPU ranks. ``backend``: the attention kernel
    (``fastattn_dist.attention``). ``cuda_graph``: replay each input shape as one CUDA graph.
    ``check_inputs``: on the first call of each shape, check across ranks that every rank got the same
    shape, mask and input (one small all-gather); off by default in the API, on in the CLI.
    ``tile_streams``: how tiles share a GPU: "auto" (default: per shape, "one" when the cost model finds the
    block comm-bound, else "overlap"), or one of row_parallel.py's modes ("one", "overlap", "staged", "lead").
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 tiles: Tiles = "auto", group=None, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, rope_theta: Optional[float] = None,
                 backend: str = "auto", link: Optional[LinkModel] = None,
                 profile: Optional[DeviceProfile] = None, plan_options: TilePlanOptions = TilePlanOptions(),
                 cuda_graph: bool = False, comm="nccl", check_inputs: bool = False, tile_streams: str = "auto"):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        world, rank = self._check_comm(comm, group)
        self.shape = TPShape.checked(hidden_size, num_heads, num_kv_heads, world, rank)
        self.tiles = check_tiles(tiles)
        self.rotary = Rotary(self.shape.head_dim, rope_theta) if rope_theta is not None else None
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
        if link is not None and not isinstance(link, LinkModel):
            raise TypeError(f"link must be a LinkModel, got {type(link).__name__}")
        if not isinstance(plan_options, TilePlanOptions):
            raise TypeError(f"plan_options must be a TilePlanOptions, got {type(plan_options).__name__}")
        self.comm = comm
        self.group = group
        self.link = link
        self.plan_options = plan_options
        self.check_inputs = bool(check_inputs)
        if tile_streams not in TILE_STREAMS + ("auto",):
            raise ValueError(f"tile_streams must be 'auto' or one of {TILE_STREAMS}, got {tile_streams!r}")
        self.tile_streams = tile_streams
        self._profile = profile
        s = self.shape
        D = s.head_dim
        kw = {"dtype": dtype, "device": device}
        self.q_proj = nn.Linear(hidden_size, s.local_heads * D, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, s.local_kv_heads * D, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, s.local_kv_heads * D, bias=False, **kw)
        self.o_proj = TiledRowParallelLinear(s.local_heads * D, hidden_size, **kw)
        why = available(backend, self.o_proj.weight.device)
        if why:
            raise ValueError(why)
        self.backend = resolve_backend(backend, self.o_proj.weight.device)
        self.recorder = None  # a profiler.SpanRecorder, or None (off: costs nothing)
        self.last_plan: Optional[TilePlan] = None
        self.last_comm: Optional[str] = None  # the comm path the last call used
        self.last_streams: Optional[str] = None  # and how its tiles shared the GPU
        self._comms: Optional[Dict[str, object]] = None
        self._plans = LRUCache(MAX_PLANS)
        self.cuda_graph = bool(cuda_graph)
        self._graph_capture = capture_cuda if self.o_proj.weight.device.type == "cuda" else run_eagerly
        self._graphs = LRUCache(MAX_GRAPHS)
        self._checked = set()
        self._loaded: set = set()  # which of "qkv", "o_proj" hold weights: nothing computes on torch.empty

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
        self._loaded = {"qkv", "o_proj"}

    @torch.no_grad()
    def load_o_proj_shard(self, wo_local: torch.Tensor) -> None:
        """This rank's o_proj columns directly (``[hidden, local_heads * head_dim]``): enough for ``attend``."""
        w = self.o_proj.weight
        if not isinstance(wo_local, torch.Tensor) or tuple(wo_local.shape) != tuple(w.shape):
            raise ValueError(f"the o_proj shard must be a tensor of shape {list(w.shape)}, got "
                             f"{list(wo_local.shape) if isinstance(wo_local, torch.Tensor) else type(wo_local).__name__}")
        w.copy_(wo_local.to(device=w.device, dtype=w.dtype))
        self._loaded.add("o_proj")

    def _require_weights(self, *parts: str) -> None:
        missing = [p for p in parts if p not in self._loaded]
        if missing:
            raise ValueError(f"TPAttention has no {' and '.join(missing)} weights yet: call load_full_weights(wq, wk, "
                             "wv, wo) first (its parameters are uninitialised memory until then)")

    # -- comm and tile plan ---------------------------------------------------------------------
    @staticmethod
    def _check_comm(comm, group) -> Tuple[int, int]:
        """(world size, rank) of the group ``comm`` reduces over; bad values raise here, on every rank."""
        if isinstance(comm, str):
            if comm not in COMM_PATHS + ("auto",):
                raise ValueError(f"comm must be one of {COMM_PATHS + ('auto',)}, a comm object or a dict of them, "
                                 f"got {comm!r}")
            if group is not None and not (dist.is_available() and dist.is_initialized()):
                raise ValueError("a process group was given but torch.distributed is not initialised")
            return group_world_rank(group)
        objs = list(comm.values()) if isinstance(comm, dict) else [comm]
        if not objs:
            raise ValueError("comm: an empty dict of comm paths")
        for c in objs:
            for attr in ("world_size", "rank", "prepare", "start", "wait", "wait_all"):
                if not hasattr(c, attr):
                    raise TypeError(f"comm must be one of {COMM_PATHS + ('auto',)}, a comm object with {attr!r} "
                                    f"or a dict of them, got {type(c).__name__}")
        if len({(c.world_size, c.rank) for c in objs}) != 1:
            raise ValueError("the comm paths of a dict must reduce over the same group (world size and rank)")
        return objs[0].world_size, objs[0].rank

    def comm_paths(self) -> Dict[str, object]:
        """The comm paths this block may use, by name (built on first use: they need the device's streams).
        "auto" offers the process group's all-reduce and, where it runs, the copy-engine path."""
        if self._comms is None:
            device = self.o_proj.weight.device
            if isinstance(self.comm, dict):
                self._comms = dict(self.comm)
            elif not isinstance(self.comm, str):
                self._comms = {type(self.comm).__name__: self.comm}
            elif self.comm == "auto":
                self._comms = {"nccl": make_comm("nccl", self.group, device, self.link)}
                if copy_engine_available(device, self.group):
                    self._comms["copy_engine"] = make_comm("copy_engine", self.group, device, self.link)
            else:
                self._comms = {self.comm: make_comm(self.comm, self.group, device, self.link)}
        return self._comms

    @property
    def profile(self) -> DeviceProfile:
        return self._profile or profile_for(self.o_proj.weight.device)

    def choice_for(self, batch: int, seq: int, mask: MaskLike = "causal", tiles: Optional[Tiles] = None):
        """(tile plan, comm path name, tile streams mode) for this input shape and mask (cached; no device sync)."""
        m = resolve_mask(mask)
        tiles = self.tiles if tiles is None else check_tiles(tiles)
        key = (batch, seq, m.structure(), tiles)
        choice = self._plans.get(key)
        if choice is None:
            s = self.shape
            cost = BlockCost(batch, seq, s.hidden_size, s.local_heads, s.head_dim, s.world_size,
                             self.o_proj.weight.element_size())
            comms = {name: CommOption(getattr(c, "model", None), c.sm_fraction if hasattr(c, "sm_fraction") else 0.0)
                     for name, c in self.comm_paths().items()}
            if isinstance(tiles, TilePlan) and tiles.rows != batch * seq:
                raise ValueError(f"the tile plan covers {tiles.rows} rows, the input has batch x seq = {batch * seq}")
            pred, name = choose(cost, m, tiles, profile=self.profile, comms=comms, link=self.link,
                                options=self.plan_options, measured=self._measured(cost, m))
            streams = tile_streams_for(pred) if self.tile_streams == "auto" else self.tile_streams
            choice = (pred.plan, name, streams)
            self._plans.put(key, choice)
        return choice

    def _measured(self, cost: BlockCost, m: Mask):
        """Plans timed on this GPU by ``fastattn-dist tune`` for this shape, if a tuned profile has them."""
        from .tune import lookup

        return lookup(self.o_proj.weight.device, cost, m)

    def plan_for(self, batch: int, seq: int, mask: MaskLike = "causal", tiles: Optional[Tiles] = None) -> TilePlan:
        """The tile plan ``forward`` uses for this input shape and mask."""
        return self.choice_for(batch, seq, mask, tiles)[0]

    # -- forward ---------------------------------------------------------------------------------
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

    def _check_across_ranks(self, what: torch.Tensor, m: Mask, same_values: bool = True) -> None:
        """First call of a shape: every rank must see the same shape, mask and (``same_values``: the replicated
        input of ``forward``, not ``attend``'s per-rank heads) input values. One all-gather."""
        key = (tuple(what.shape), m.structure())
        if not self.check_inputs or key in self._checked or not isinstance(self.comm, str):
            return  # comm objects (an emulated group) have no process group to ask
        world, rank = group_world_rank(self.group)
        if world > 1:
            from .runner import check_same_on_all_ranks

            kl = m.key_lengths
            facts = {"shape": list(what.shape),
                     "mask": ("causal" if m.causal else "none") + (f" window {m.window}" if m.window else ""),
                     "key_lengths": None if kl is None else kl.tolist(),
                     "input_checksum": None}
            if same_values:
                rows = what.sum(-1, dtype=torch.float64).flatten()  # per-row sums: cheap, and see the rows' order
                pos = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)
                facts["input_checksum"] = [float(rows.sum()), float((rows * pos).sum()), float(rows.abs().sum())]
            check_same_on_all_ranks(facts, self.group, what="the block's input")
        self._checked.add(key)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, mask: MaskLike = "causal", tiles: Optional[Tiles] = None) -> torch.Tensor:
        """``x``: ``[batch, seq, hidden]``, the same on every rank. Returns the all-reduced output."""
        self._check_input(x)
        m = resolve_mask(mask)
        m.validate(x.shape[0], x.shape[1])
        tiles = self.tiles if tiles is None else check_tiles(tiles)
        self._require_weights("qkv", "o_proj")
        self._check_across_ranks(x, m)
        rec = self.recorder
        with span(rec, "block", -1, BLOCK):
            with span(rec, "qkv"):
                q, k, v = self.project_qkv(x)
            return self._attend(q, k, v, m, tiles)

    def project_qkv(self, x: torch.Tensor):
        """This rank's q ``[B, S, local_heads, D]`` and k, v ``[B, S, local_kv_heads, D]`` (RoPE applied)."""
        B, S, _ = x.shape
        s = self.shape
        q = self.q_proj(x).view(B, S, s.local_heads, s.head_dim)
        k = self.k_proj(x).view(B, S, s.local_kv_heads, s.head_dim)
        v = self.v_proj(x).view(B, S, s.local_kv_heads, s.head_dim)
        if self.rotary is not None:
            q, k = self.rotary.apply(q), self.rotary.apply(k)
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
        tiles = self.tiles if tiles is None else check_tiles(tiles)
        self._require_weights("o_proj")
        self._check_across_ranks(q, m, same_values=False)  # each rank holds its own heads
        return self._attend(q, k, v, m, tiles)

    def _attend(self, q, k, v, m: Mask, tiles) -> torch.Tensor:
        B, S = q.shape[:2]
        plan, comm_name, streams = self.choice_for(B, S, m, tiles)
        self.last_plan, self.last_comm, self.last_streams = plan, comm_name, streams
        comm = self.comm_paths()[comm_name]
        H = self.shape.hidden_size
        if self.cuda_graph and self.recorder is None:
            key = (B, S, m.structure(), plan.bounds, comm_name, streams)
            call = self._graphs.get(key)
            if call is None:
                def fn(q_, k_, v_, kl_, out):
                    mk = m if kl_ is None else Mask(m.causal, m.window, kl_)
                    self._run_tiles(q_, k_, v_, mk, plan, comm, streams, out)
                call = CapturedCall(fn, (q, k, v, m.key_lengths), (B, S, H), self._graph_capture)
                self._graphs.put(key, call)
            return call(q, k, v, m.key_lengths)
        out = torch.empty(B, S, H, dtype=q.dtype, device=q.device)
        self._run_tiles(q, k, v, m, plan, comm, streams, out)
        return out

    def _run_tiles(self, q, k, v, m: Mask, plan: TilePlan, comm, streams: str, out: torch.Tensor) -> torch.Tensor:
        B, S, Hl, D = q.shape
        rec = self.recorder
        comm.enable_timing(rec is not None)
        buf = None  # the o_proj input rows of tiles that span several sequences (one allocation per call)

        def produce(i: int, r0: int, r1: int) -> torch.Tensor:
            nonlocal buf
            with span(rec, "attention", i):
                segs = list(tile_segments(r0, r1, S))
                if len(segs) == 1:  # the kernel's own output is the GEMM's input: no copy
                    b0, b1, s0, s1 = segs[0]
                    qs = q[b0:b1, s0:s1]
                    ms = m.slice_batch(b0, b1)
                    o = run_kernel(kernel_for(self.backend, qs, k, ms, s0, False), qs, k[b0:b1], v[b0:b1], ms,
                                   q_offset=s0)
                    return o.reshape(r1 - r0, Hl * D)
                if buf is None:
                    buf = torch.empty(B * S, Hl * D, dtype=q.dtype, device=q.device)
                for b0, b1, s0, s1 in segs:
                    dst = buf[b0 * S + s0: (b1 - 1) * S + s1].view(b1 - b0, s1 - s0, Hl, D)
                    qs, ms = q[b0:b1, s0:s1], m.slice_batch(b0, b1)
                    run_kernel(kernel_for(self.backend, qs, k, ms, s0, False), qs, k[b0:b1], v[b0:b1], ms,
                               q_offset=s0, out=dst)
                return buf[r0:r1]

        handles = self.o_proj.run(plan, produce, out.view(B * S, -1), comm, rec, "o_proj", streams)
        comm.wait_all(handles)
        if rec is not None:
            rec.comm(handles)
        return out

    def extra_repr(self) -> str:
        s = self.shape
        return (f"hidden={s.hidden_size}, heads={s.num_heads}, kv_heads={s.num_kv_heads}, "
                f"tp={s.world_size}, rank={s.rank}, tiles={self.tiles}, backend={self.backend}")
