"""TPAttention: the tensor-parallel attention sublayer with tiling-AllReduce, the block of the product and the
attention sublayer of every model layer.

Parts (parallel/layers.py): a fused column-parallel q/k/v projection (this rank's heads), RoPE, a KV sink (where
a tile writes its keys and values and attends to all before them: kv.py, or the model's KV cache), and the
tiled row-parallel o_proj. ``forward`` takes the replicated ``[batch, seq, hidden]`` input and returns the full
output on every rank. Under a causal mask every tile runs q/k/v -> attention -> o_proj partial sum -> an
asynchronous all-reduce of the tile's rows, while tile i+1 computes (its keys before it were written by the
tiles before); without one, q/k/v runs over all rows first and the tiles then attend to all keys.

A model chains these per-tile pieces with its MLPs (models/prefill.py): ``tile_rows`` is the sublayer's work
for the rows of one tile, the same code the block's ``forward`` runs.

``attn_precision`` "int8" / "fp8" / "int8-fp8": every tile attends through the 8-bit kernels (a
``kv.QuantizedLayerKV`` sink). The block quantizes K/V once per call, over all its keys (the method's statistics),
so its causal ``forward`` projects q/k/v for all rows before the first tile (as the non-causal path does):
every tile then reads the same 8-bit keys, so a row's attention does not depend on the tiling (on the CPU
torch path up to float32 ulps of torch's vectorised exp2; the o_proj GEMM rounds per tile as in the bf16 block).
The cost: the q/k/v GEMM of later tiles no longer overlaps the first tiles' all-reduces. The model's tiles, whose keys arrive
tile by tile, quantize the keys each one needs (kv.py says why).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .attention import available, resolve_backend
from .kv import KVSink, LayerKV, QuantizedLayerKV, TileOrder
from .lru import LRUCache
from .masks import Mask, MaskLike, resolve_mask
from .parallel.checks import check_same_on_all_ranks
from .parallel.comm import CommPath, group_world_rank
from .parallel.comm_paths import COMM_PATHS, paths_for
from .parallel.graphs import CapturedCall, capture_cuda, run_eagerly
from .parallel.layers import TILE_STREAMS, ColumnParallelLinear, TiledRowParallelLinear
from .parallel.link_models import LinkModel
from .parallel.sharding import TPShape, shard_full_weights
from .parallel.tile_plan import TilePlan, tile_segments
from .recorder import BLOCK, span
from .rope import Rotary
from .tuning.cost_model import BlockCost, CommOption, DeviceProfile, TilePlanOptions, choose, profile_for, tile_streams_for
from .tuning.measured import lookup

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


def comm_world_rank(comm, group) -> Tuple[int, int]:
    """(world size, rank) of the group ``comm`` reduces over; bad values raise here, on every rank."""
    if isinstance(comm, str):
        if comm not in COMM_PATHS + ("auto",):
            raise ValueError(f"comm must be one of {COMM_PATHS + ('auto',)}, a comm object or a dict of them, "
                             f"got {comm!r}")
        if group is not None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return group_world_rank(group)
    objs = list(comm.values()) if isinstance(comm, dict) else [comm]
    if not objs:
        raise ValueError("comm: an empty dict of comm paths")
    for c in objs:
        if not isinstance(c, CommPath):
            raise TypeError(f"comm must be one of {COMM_PATHS + ('auto',)}, a comm object (parallel.comm.CommPath) "
                            f"or a dict of them, got {type(c).__name__}")
    if len({(c.world_size, c.rank) for c in objs}) != 1:
        raise ValueError("the comm paths of a dict must reduce over the same group (world size and rank)")
    return objs[0].world_size, objs[0].rank


def check_input(x: torch.Tensor, shape: TPShape, w: torch.Tensor) -> None:
    """``forward``'s input: ``[batch, seq, hidden]``, non-empty, the weights' dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != shape.hidden_size:
        raise ValueError(f"x must have shape [batch, seq, {shape.hidden_size}], got {list(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x is empty: shape {list(x.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the block's weights are {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the block's weights are on {w.device}")


def check_projected(q, k, v, shape: TPShape, w: torch.Tensor) -> None:
    """``attend``'s input: this rank's q ``[B, S, local_heads, D]`` and k, v ``[B, S, local_kv_heads, D]``."""
    for name, t, heads in (("q", q, shape.local_heads), ("k", k, shape.local_kv_heads), ("v", v, shape.local_kv_heads)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[2:] != (heads, shape.head_dim):
            raise ValueError(f"{name} must be [batch, seq, {heads}, {shape.head_dim}] (this rank's heads), "
                             f"got {list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != w.dtype or t.device != w.device:
            raise TypeError(f"{name} must be {w.dtype} on {w.device}, got {t.dtype} on {t.device}")
    if k.shape[:2] != q.shape[:2] or v.shape != k.shape or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"q, k, v must share a non-empty [batch, seq], got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")


def check_same_input(what: torch.Tensor, m: Mask, group, same_values: bool) -> None:
    """Every rank must see the same shape, mask and (``same_values``: the replicated input of ``forward``, not
    ``attend``'s per-rank heads) input values; names the ranks that differ."""
    world, _ = group_world_rank(group)
    if world == 1:
        return
    kl = m.key_lengths
    facts = {"shape": list(what.shape),
             "mask": ("causal" if m.causal else "none") + (f" window {m.window}" if m.window else ""),
             "key_lengths": None if kl is None else kl.tolist(), "input_checksum": None}
    if same_values:
        rows = what.sum(-1, dtype=torch.float64).flatten()  # per-row sums: cheap, and see the rows' order
        pos = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)
        facts["input_checksum"] = [float(rows.sum()), float((rows * pos).sum()), float(rows.abs().sum())]
    check_same_on_all_ranks(facts, group, what="the block's input")


class TPAttention(nn.Module):
    """Tensor-parallel attention sublayer; see the module docstring.

    ``tiles``: tile count of the tiling-AllReduce, or "auto" (the cost model, tuning/); 1 is the sequential
    block. ``group``: the process group (default: the world group; a single process without torch.distributed
    runs as world size 1). ``comm``: "nccl" (the process group's all-reduce; gloo on CPU), "copy_engine"
    (symmetric memory, one node of GPUs), "auto" (per input shape, the path the cost model predicts fastest), a
    comm object (``parallel.comm.CommPath``) such as ``parallel.emulated_comm.StandInAllReduce(4)``, which makes
    this process rank 0 of an emulated TP=4 group on one GPU, or a dict of comm objects to choose from per
    shape. ``link``: a simulated link for CPU ranks. ``backend``: the attention kernel
    (``fastattn_dist.attention``). ``cuda_graph``: replay each input shape as one CUDA graph. ``check_inputs``:
    on the first call of each shape, check across ranks that every rank got the same shape, mask and input
    (one small all-gather); off by default in the API, on in the CLI. ``tile_streams``: how tiles share a GPU:
    "auto" (default: per shape, "one" when the cost model finds the block comm-bound, else "overlap"), or one of
    parallel/layers.py's modes. ``head_dim``: default hidden / heads; ``rotary``: a ``Rotary`` (default: one of
    ``rope_theta``, or none); ``qkv_bias``/``o_bias``: projections with biases (Qwen2, some Llamas).
    ``attn_precision``: "bf16" (default: no quantization) or 8-bit attention, "int8", "fp8", "int8-fp8" (the
    module docstring; ``fastattn_dist.attention``'s ``precision``).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 tiles: Tiles = "auto", group=None, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, rope_theta: Optional[float] = None,
                 backend: str = "auto", link: Optional[LinkModel] = None,
                 profile: Optional[DeviceProfile] = None, plan_options: TilePlanOptions = TilePlanOptions(),
                 cuda_graph: bool = False, comm="nccl", check_inputs: bool = False, tile_streams: str = "auto",
                 head_dim: Optional[int] = None, rotary: Optional[Rotary] = None, qkv_bias: bool = False,
                 o_bias: bool = False, attn_precision: str = "bf16"):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        world, rank = comm_world_rank(comm, group)
        self.shape = s = TPShape.checked(hidden_size, num_heads, num_kv_heads, world, rank, head_dim=head_dim)
        self.tiles = check_tiles(tiles)
        self.rotary = rotary if rotary is not None else (Rotary(s.head_dim, rope_theta) if rope_theta is not None
                                                         else None)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
        if link is not None and not isinstance(link, LinkModel):
            raise TypeError(f"link must be a LinkModel, got {type(link).__name__}")
        if not isinstance(plan_options, TilePlanOptions):
            raise TypeError(f"plan_options must be a TilePlanOptions, got {type(plan_options).__name__}")
        if tile_streams not in TILE_STREAMS + ("auto",):
            raise ValueError(f"tile_streams must be 'auto' or one of {TILE_STREAMS}, got {tile_streams!r}")
        self.comm, self.group, self.link = comm, group, link
        self.plan_options, self.tile_streams, self._profile = plan_options, tile_streams, profile
        self.check_inputs = bool(check_inputs)
        kw = {"dtype": dtype, "device": device}
        self.qkv = ColumnParallelLinear(hidden_size, sum(s.qkv_split), bias=qkv_bias, **kw)
        self.o_proj = TiledRowParallelLinear(s.local_heads * s.head_dim, hidden_size, bias=o_bias, **kw)
        why = available(backend, self.o_proj.weight.device, attn_precision)
        if why:
            raise ValueError(why)
        self.backend = resolve_backend(backend, self.o_proj.weight.device, attn_precision)
        self.attn_precision = attn_precision
        self.recorder = None  # a SpanRecorder, or None (off: costs nothing)
        self.last_plan: Optional[TilePlan] = None
        self.last_comm: Optional[str] = None  # the comm path the last call used
        self.last_streams: Optional[str] = None  # and how its tiles shared the GPU
        self._comms: Optional[Dict[str, CommPath]] = None
        self._plans = LRUCache(MAX_PLANS)
        self.cuda_graph = bool(cuda_graph)
        self._graph_capture = capture_cuda if self.o_proj.weight.device.type == "cuda" else run_eagerly
        self._graphs = LRUCache(MAX_GRAPHS)
        self._checked = set()

    def _ranks_agree(self, what: torch.Tensor, m: Mask, same_values: bool = True) -> None:
        """``check_inputs``: on the first call of a shape, every rank must see the same input (one all-gather).
        Comm objects (an emulated group) have no process group to ask."""
        key = (tuple(what.shape), m.structure())
        if self.check_inputs and key not in self._checked and isinstance(self.comm, str):
            check_same_input(what, m, self.group, same_values)
            self._checked.add(key)

    @property
    def world_size(self) -> int:
        return self.shape.world_size

    @property
    def rank(self) -> int:
        return self.shape.rank

    # -- weights ---------------------------------------------------------------------------------------
    def load_full_weights(self, wq, wk, wv, wo) -> None:
        """Take unsharded ``nn.Linear``-layout weights (``[out, in]``) and keep this rank's shard."""
        shards = shard_full_weights(self.shape, wq, wk, wv, wo)
        self.qkv.load(shards["qkv"])
        self.o_proj.load(shards["wo"])

    def load_o_proj_shard(self, wo_local: torch.Tensor) -> None:
        """This rank's o_proj columns directly (``[hidden, local_heads * head_dim]``): enough for ``attend``."""
        self.o_proj.load(wo_local)

    def _require_weights(self, qkv: bool) -> None:
        missing = [n for n, lin in (("qkv", self.qkv), ("o_proj", self.o_proj)) if (qkv or n == "o_proj")
                   and not lin.loaded]
        if missing:
            raise ValueError(f"TPAttention has no {' and '.join(missing)} weights yet: call load_full_weights(wq, wk, "
                             "wv, wo) first (its parameters are uninitialised memory until then)")

    # -- comm and tile plan ---------------------------------------------------------------------------
    def comm_paths(self) -> Dict[str, CommPath]:
        """The comm paths this block may use, by name (built on first use: they need the device's streams)."""
        if self._comms is None:
            self._comms = paths_for(self.comm, self.group, self.o_proj.weight.device, self.link)
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
            if isinstance(tiles, TilePlan) and tiles.rows != batch * seq:
                raise ValueError(f"the tile plan covers {tiles.rows} rows, the input has batch x seq = {batch * seq}")
            cost = BlockCost(batch, seq, s.hidden_size, s.local_heads, s.head_dim, s.world_size,
                             self.o_proj.weight.element_size())
            comms = {name: CommOption(c.model, c.sm_fraction) for name, c in self.comm_paths().items()}
            pred, name = choose(cost, m, tiles, profile=self.profile, comms=comms, link=self.link,
                                options=self.plan_options, measured=lookup(self.o_proj.weight.device, cost, m))
            streams = tile_streams_for(pred) if self.tile_streams == "auto" else self.tile_streams
            choice = (pred.plan, name, streams)
            self._plans.put(key, choice)
        return choice

    def plan_for(self, batch: int, seq: int, mask: MaskLike = "causal", tiles: Optional[Tiles] = None) -> TilePlan:
        """The tile plan ``forward`` uses for this input shape and mask."""
        return self.choice_for(batch, seq, mask, tiles)[0]

    # -- the sublayer's work for the rows of one tile (the block's forward and a model's prefill) -------
    def project(self, x_rows: torch.Tensor):
        """q ``[n, local_heads, D]`` and k, v ``[n, local_kv_heads, D]`` of ``n`` token rows (before RoPE)."""
        s = self.shape
        q, k, v = self.qkv(x_rows).split(s.qkv_split, dim=-1)
        D = s.head_dim
        return q.view(-1, s.local_heads, D), k.view(-1, s.local_kv_heads, D), v.view(-1, s.local_kv_heads, D)

    def sink_for(self, kv: LayerKV, complete: bool = False, key_lengths: Optional[torch.Tensor] = None) -> KVSink:
        """The sink this sublayer's tiles write and attend through, over the keys ``kv`` holds: ``kv`` itself, or
        at an 8-bit ``attn_precision`` a ``QuantizedLayerKV`` over it (``complete``: ``kv`` holds every key)."""
        if self.attn_precision == "bf16":
            return kv
        return QuantizedLayerKV(kv, self.attn_precision, complete=complete, key_lengths=key_lengths,
                                backend=self.backend)

    def _rope(self, t: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        return t if self.rotary is None else self.rotary.apply(t, positions)

    def tile_rows(self, x_rows: torch.Tensor, r0: int, r1: int, seq_len: int, sink: KVSink, mask: Mask,
                  positions: Optional[torch.Tensor] = None, start: int = 0, tile: int = -1,
                  order: Optional[TileOrder] = None) -> torch.Tensor:
        """Causal attention output ``[r1 - r0, local_heads * D]`` (o_proj's input) of flat rows [r0, r1) of a
        ``[batch, seq_len]`` prefill at positions start.. (``positions``: on the device, covering them): q/k/v
        of ``x_rows``, RoPE, ``sink`` stores the keys, then attends. ``mask``: causal, with the batch's window and
        key lengths; ``order``: the tiles' key order when they run on several streams (kv.TileOrder)."""
        rec, s = self.recorder, self.shape
        Hl, Hkv, D = s.local_heads, s.local_kv_heads, s.head_dim
        with span(rec, "qkv", tile):
            q, k, v = self.project(x_rows)
        with span(rec, "attention", tile):
            pieces = []
            for b0, b1, s0, s1 in tile_segments(r0, r1, seq_len):
                n, L, o0 = b1 - b0, s1 - s0, (b0 * seq_len + s0) - r0
                rows = slice(o0, o0 + n * L)
                pos = None if positions is None else positions[start + s0:start + s1]
                qkv = (self._rope(q[rows].view(n, L, Hl, D), pos), self._rope(k[rows].view(n, L, Hkv, D), pos),
                       v[rows].view(n, L, Hkv, D))
                sink.write(b0, b1, start + s0, qkv[1], qkv[2])
                pieces.append((rows, b0, b1, s0, qkv))
            if order is not None:
                order.written(tile)
            out = None if len(pieces) == 1 else torch.empty(r1 - r0, Hl * D, dtype=x_rows.dtype, device=x_rows.device)
            for rows, b0, b1, s0, (qs, ks, vs) in pieces:
                dst = None if out is None else out[rows].view(b1 - b0, -1, Hl, D)
                o = sink.attend_written(qs, ks, vs, b0, b1, start + s0, mask.slice_batch(b0, b1), self.backend, dst)
                if out is None:  # one sequence piece: the kernel's own output is the GEMM's input
                    return o.reshape(r1 - r0, Hl * D)
            return out

    def _attend_rows(self, q: torch.Tensor, sink: LayerKV, r0: int, r1: int, seq_len: int, m: Mask,
                     tile: int) -> torch.Tensor:
        """Attention output of flat rows [r0, r1) from projected queries ``q`` ``[B, S, Hl, D]`` against keys the
        sink holds for every row (the non-causal path, and ``attend``)."""
        Hl, D = self.shape.local_heads, self.shape.head_dim
        with span(self.recorder, "attention", tile):
            segs = list(tile_segments(r0, r1, seq_len))
            out = None if len(segs) == 1 else torch.empty(r1 - r0, Hl * D, dtype=q.dtype, device=q.device)
            for b0, b1, s0, s1 in segs:
                o0 = (b0 * seq_len + s0) - r0
                dst = None if out is None else out[o0:o0 + (b1 - b0) * (s1 - s0)].view(b1 - b0, s1 - s0, Hl, D)
                o = sink.attend(q[b0:b1, s0:s1], b0, b1, s0, seq_len, m.slice_batch(b0, b1), self.backend, dst)
                if out is None:
                    return o.reshape(r1 - r0, Hl * D)
            return out

    # -- forward ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor, mask: MaskLike = "causal", tiles: Optional[Tiles] = None) -> torch.Tensor:
        """``x``: ``[batch, seq, hidden]``, the same on every rank. Returns the all-reduced output."""
        check_input(x, self.shape, self.o_proj.weight)
        m = resolve_mask(mask)
        m.validate(x.shape[0], x.shape[1])
        tiles = self.tiles if tiles is None else check_tiles(tiles)
        self._require_weights(qkv=True)
        self._ranks_agree(x, m)
        with span(self.recorder, "block", -1, BLOCK):
            return self._run("forward", (x,), m, tiles)

    def project_qkv(self, x: torch.Tensor):
        """This rank's q ``[B, S, local_heads, D]`` and k, v ``[B, S, local_kv_heads, D]`` (RoPE applied)."""
        B, S, _ = x.shape
        q, k, v = self.project(x.reshape(B * S, -1))
        s = self.shape
        q = self._rope(q.view(B, S, s.local_heads, s.head_dim), None)
        k = self._rope(k.view(B, S, s.local_kv_heads, s.head_dim), None)
        return q, k, v.view(B, S, s.local_kv_heads, s.head_dim)

    @torch.no_grad()
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike = "causal",
               tiles: Optional[Tiles] = None) -> torch.Tensor:
        """Attention -> o_proj -> all-reduce, tiled, from this rank's projected q, k, v (``project_qkv``'s layout)."""
        check_projected(q, k, v, self.shape, self.o_proj.weight)
        m = resolve_mask(mask)
        m.validate(q.shape[0], q.shape[1])
        tiles = self.tiles if tiles is None else check_tiles(tiles)
        self._require_weights(qkv=False)
        self._ranks_agree(q, m, same_values=False)  # each rank holds its own heads
        return self._run("attend", (q, k, v), m, tiles)

    def _run(self, entry: str, inputs: tuple, m: Mask, tiles) -> torch.Tensor:
        """``forward``'s or ``attend``'s pipeline, eagerly or as the CUDA graph of this shape."""
        B, S = inputs[0].shape[:2]
        plan, comm_name, streams = self.choice_for(B, S, m, tiles)
        self.last_plan, self.last_comm, self.last_streams = plan, comm_name, streams
        comm = self.comm_paths()[comm_name]
        shape = (B, S, self.shape.hidden_size)
        if self.cuda_graph and self.recorder is None:
            key = (entry, B, S, m.structure(), plan.bounds, comm_name, streams)
            call = self._graphs.get(key)
            if call is None:
                def fn(*args, out):
                    kl = args[-1]
                    self._pipeline(entry, args[:-1], m if kl is None else Mask(m.causal, m.window, kl), plan, comm,
                                   streams, out)
                call = CapturedCall(fn, (*inputs, m.key_lengths), shape, self._graph_capture)
                self._graphs.put(key, call)
            return call(*inputs, m.key_lengths)
        out = torch.empty(shape, dtype=inputs[0].dtype, device=inputs[0].device)
        self._pipeline(entry, inputs, m, plan, comm, streams, out)
        return out

    def _pipeline(self, entry: str, inputs: tuple, m: Mask, plan: TilePlan, comm: CommPath, streams: str,
                  out: torch.Tensor) -> None:
        rec, s = self.recorder, self.shape
        B, S = inputs[0].shape[:2]
        comm.enable_timing(rec is not None)
        if entry == "forward" and m.causal and self.attn_precision == "bf16":
            # q/k/v tile by tile: tile i's keys are all it and earlier tiles need
            x = inputs[0].reshape(B * S, -1)
            sink = LayerKV.empty(B, S, s.local_kv_heads, s.head_dim, x.dtype, x.device)
            positions = None
            if self.rotary is not None:
                positions = torch.arange(S, device=x.device)
                self.rotary.reserve(S, x.device, x.dtype)
            order = TileOrder(plan.num_tiles, x.device) if streams != "one" else None

            def produce(i: int, r0: int, r1: int) -> torch.Tensor:
                return self.tile_rows(x[r0:r1], r0, r1, S, sink, m, positions, 0, i, order)
        else:  # every tile attends to every row's keys (or to 8-bit keys quantized once): project all rows first
            if entry == "forward":
                with span(rec, "qkv"):
                    q, k, v = self.project_qkv(inputs[0])
            else:
                q, k, v = inputs
            sink = self.sink_for(LayerKV(k, v), complete=True, key_lengths=m.key_lengths)

            def produce(i: int, r0: int, r1: int) -> torch.Tensor:
                return self._attend_rows(q, sink, r0, r1, S, m, i)

        handles = self.o_proj.run(plan, produce, out.view(B * S, -1), comm, rec, "o_proj", streams)
        comm.wait_all(handles)
        if self.o_proj.bias is not None:
            out += self.o_proj.bias
        if rec is not None:
            rec.comm(handles)

    def extra_repr(self) -> str:
        s = self.shape
        return (f"hidden={s.hidden_size}, heads={s.num_heads}, kv_heads={s.num_kv_heads}, "
                f"tp={s.world_size}, rank={s.rank}, tiles={self.tiles}, backend={self.backend}"
                + ("" if self.attn_precision == "bf16" else f", attn_precision={self.attn_precision}"))
