"""The parallel layers the block and the model are built from (Megatron style), and the collective each needs.

  ``ColumnParallelLinear``     y_local = x @ W_local^T (+ b_local): this rank's output columns (its heads, its
                               slice of the intermediate size); the input is replicated, no collective.
  ``TiledRowParallelLinear``   y = sum over ranks of x_local @ W_local^T, all-reduced tile by tile
                               (tiling-AllReduce): o_proj and the MLP's down projection.
  ``VocabParallelEmbedding``   each rank looks up its vocabulary slice; the rows are summed (one all-reduce).
  ``VocabParallelLMHead``      each rank computes the logits of its vocabulary slice; they are gathered.

Every weight is allocated empty and marked loaded only when ``load`` filled it (``loaded``): the block and the
model refuse to compute before that, never reading uninitialised memory. Collectives go through the comm
interface (comm.py), so the real paths, the CPU link model and the GPU stand-in plug in alike.

The tiled row-parallel linear: each rank holds the input columns of its share, so its product is a partial
sum of the full output. The token rows are cut into tiles (``TilePlan``); for tile i the caller's
``produce(i, r0, r1)`` computes the tile's input rows (attention, or the MLP's activation), the GEMM writes
the tile's partial sums, and the tile's all-reduce is issued at once, while tile i+1 computes. With one tile
this is exactly the sequential layer.

On CUDA the tiles' kernels go to streams by ``tile_streams`` (measured on one H100, docs/gpu_emulation.md):

  "one"      every tile on the caller's stream: each kernel drains the GPU before the next starts.
  "overlap"  tile i on its own stream at a priority below tile i-1's (and the comm stream above all):
             a later tile fills the SMs an earlier one leaves idle. Fastest compute, but tile i+1's
             attention holds the SMs tile i's GEMM needs when it becomes ready, so the all-reduce
             chain starts late: worse when comm is the critical path.
  "staged"   as overlap, but tile i+1's input (its attention) starts only once tile i's is done: tile
             i's GEMM, higher in priority, takes the SMs first, and tile i+1's attention fills its tail.
             At TP >= 4 a late tile's attention is under one wave, and only other attention fills the
             rest: the compute tax stays that of "one".
  "lead"     tile 0 alone on the GPU (its all-reduce, the head of the comm chain, starts as early as it
             can), then tiles 1.. as in overlap (their all-reduces queue behind tile 0's anyway).
On CPU the tiles run in order on the calling thread while gloo's thread moves the data.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..recorder import span
from .comm import CommHandle, CommPath
from .sharding import TPShape
from .tile_plan import TilePlan

# PyTorch creates streams at priorities 0 (lowest) to -3 (highest); the comm stream takes -3.
TILE_PRIORITIES = (-2, -1, 0)
TILE_STREAMS = ("one", "overlap", "staged", "lead")


class TileStreams:
    """Compute streams for the tiles of one device: tile i on stream i, priorities falling with i."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._streams: List[torch.cuda.Stream] = []

    def get(self, i: int) -> "torch.cuda.Stream":
        while len(self._streams) <= i:
            prio = TILE_PRIORITIES[min(len(self._streams), len(TILE_PRIORITIES) - 1)]
            self._streams.append(torch.cuda.Stream(device=self.device, priority=prio))
        return self._streams[i]

    def fork(self, n: int) -> "torch.cuda.Stream":
        """Tiles 0..n-1 may start once the caller's stream got here; returns the caller's stream."""
        main = torch.cuda.current_stream(self.device)
        for i in range(n):
            self.get(i).wait_stream(main)
        return main

    def join(self, main: "torch.cuda.Stream", n: int) -> None:
        for i in range(n):
            main.wait_stream(self.get(i))


Produce = Callable[[int, int, int], torch.Tensor]


class ShardedLinear(nn.Module):
    """A linear layer's shard on this rank: ``weight`` ``[out, in]`` (and ``bias``), empty until ``load``."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, dtype=None, device=None) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        self.loaded = False

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def load(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """This rank's shard (``nn.Linear`` layout); a bias exactly when the layer has one."""
        for name, t, p in (("weight", weight, self.weight), ("bias", bias, self.bias)):
            if p is None and t is None:
                continue
            if p is None or t is None:
                raise ValueError(f"{type(self).__name__}: {name} given but the layer has none, or the other way "
                                 "round")
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{type(self).__name__}: the {name} shard must have shape {list(p.shape)}, got {got}")
            p.copy_(t.to(device=p.device, dtype=p.dtype))
        self.loaded = True

    @torch.no_grad()
    def init_random(self, gen: torch.Generator, std: float = 0.02) -> None:
        self.weight.normal_(0.0, std, generator=gen)
        if self.bias is not None:
            self.bias.zero_()
        self.loaded = True


class ColumnParallelLinear(ShardedLinear):
    """``x @ W_local^T + b_local``: this rank's output columns of a replicated input (no collective)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class TiledRowParallelLinear(ShardedLinear):
    """A row-parallel linear (``weight``: ``[out_features, in_features_local]``) run tile by tile.

    ``run`` computes every tile's partial sums into ``out`` (``[rows, out_features]``) and issues their
    all-reduces on ``comm``; it returns the handles, so the caller waits for all (``comm.wait_all``) or
    for one tile at a time (``comm.wait``: the next sublayer's tile i needs only this tile i). The bias, if
    any, is the caller's to add once, after the reduction (``bias``).
    """

    def __init__(self, in_features_local: int, out_features: int, *, bias: bool = False, dtype=None,
                 device=None) -> None:
        super().__init__(in_features_local, out_features, bias=bias, dtype=dtype, device=device)
        self._streams: Optional[TileStreams] = None

    def streams(self) -> Optional[TileStreams]:
        if self.weight.device.type != "cuda":
            return None
        if self._streams is None:
            self._streams = TileStreams(self.weight.device)
        return self._streams

    @torch.no_grad()
    def run(self, plan: TilePlan, produce: Produce, out: torch.Tensor, comm: CommPath, recorder=None,
            name: str = "o_proj", tile_streams: str = "one", slot: int = 0) -> List[CommHandle]:
        """For each tile: ``x = produce(i, r0, r1)`` (``[r1 - r0, in_features_local]``), ``out[r0:r1] = x @ W^T``,
        all-reduce ``out[r0:r1]`` asynchronously; ``tile_streams`` as in the module docstring; ``slot``: which of
        the comm path's buffers this layer writes (consecutive sublayers of a model alternate)."""
        n = plan.num_tiles
        partials = comm.prepare(out, slot)  # where the GEMM writes: ``out``, or the copy-engine path's buffer
        streams = self.streams() if (tile_streams != "one" and n > 1) else None
        main = streams.fork(n) if streams is not None else None
        handles = []
        produced = None  # event: the previous tile's input is complete ("staged")
        for i, (r0, r1) in enumerate(plan.ranges):
            stream = streams.get(i) if streams is not None else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if produced is not None:  # staged: the previous tile's input; lead: tile 0's GEMM
                    stream.wait_event(produced)
                x = produce(i, r0, r1)
                if stream is not None and tile_streams == "staged":
                    produced = torch.cuda.Event()
                    produced.record()
                handle = self.run_tile(i, r0, r1, x, partials, comm, recorder, name)
                if stream is not None and tile_streams == "lead" and i == 0:
                    produced = torch.cuda.Event()  # tile 1 (and through it the rest) starts after tile 0's GEMM
                    produced.record()
                handles.append(handle)
        if streams is not None:
            streams.join(main, n)
        return handles

    def run_tile(self, i: int, r0: int, r1: int, x: torch.Tensor, partials: torch.Tensor, comm: CommPath,
                 recorder=None, name: str = "o_proj") -> CommHandle:
        """One tile: its partial sums ``partials[r0:r1] = x @ W^T``, then its all-reduce, issued at once."""
        with span(recorder, name, i):
            torch.matmul(x, self.weight.t(), out=partials[r0:r1])
        return comm.start(partials[r0:r1], i, (r0, r1))

    def run_rows(self, x: torch.Tensor, comm: CommPath) -> torch.Tensor:
        """The whole layer at once on ``x`` ``[rows, in_features_local]``: GEMM, all-reduce, bias (decode)."""
        y = comm.all_reduce(x @ self.weight.t())
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embeddings, this rank's vocabulary slice ``[local_vocab, hidden]``: ids outside it give zero rows,
    and the sum over ranks (one all-reduce) is the full lookup on every rank."""

    def __init__(self, shape: TPShape, *, dtype=None, device=None) -> None:
        super().__init__()
        self.shape = shape
        self.weight = nn.Parameter(torch.empty(shape.local_vocab, shape.hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.loaded = False

    @torch.no_grad()
    def load_rows(self, rows: torch.Tensor) -> None:
        """This rank's rows of the full ``[vocab, hidden]`` table (fewer on the last rank: the rest stays 0)."""
        n = rows.shape[0]
        if rows.dim() != 2 or rows.shape[1] != self.shape.hidden_size or n > self.shape.local_vocab:
            raise ValueError(f"vocabulary rows must be [<= {self.shape.local_vocab}, {self.shape.hidden_size}], got "
                             f"{list(rows.shape)}")
        self.weight.zero_()
        self.weight[:n].copy_(rows.to(device=self.weight.device, dtype=self.weight.dtype))
        self.loaded = True

    @torch.no_grad()
    def init_random(self, gen: torch.Generator, std: float = 0.02) -> None:
        self.weight.normal_(0.0, std, generator=gen)
        self.loaded = True

    def forward(self, ids: torch.Tensor, comm: CommPath) -> torch.Tensor:
        """``ids`` ``[N]`` -> ``[N, hidden]`` on every rank."""
        local = ids - self.shape.vocab_start
        mine = (local >= 0) & (local < self.shape.local_vocab)
        e = F.embedding(local.clamp(0, self.shape.local_vocab - 1), self.weight) * mine[:, None].to(self.weight.dtype)
        return comm.all_reduce(e)


class VocabParallelLMHead(nn.Module):
    """The LM head over this rank's vocabulary slice (``weight``: ``[local_vocab, hidden]``, the embedding's own
    when tied); the slices' logits are gathered, float32, cut to the real vocabulary."""

    def __init__(self, shape: TPShape, weight: Optional[nn.Parameter] = None, *, dtype=None, device=None) -> None:
        super().__init__()
        self.shape = shape
        self.tied = weight is not None
        self.weight = weight if weight is not None else nn.Parameter(
            torch.empty(shape.local_vocab, shape.hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, normed: torch.Tensor, comm: CommPath) -> torch.Tensor:
        """``normed`` ``[N, hidden]`` (the final norm's output) -> ``[N, vocab]`` float32 on every rank."""
        logits = comm.all_gather((normed @ self.weight.t()).float())
        return logits[:, : self.shape.vocab_size]
