"""Long context beyond GPU memory: the KV cache split between the device and (pinned) host memory.

Per layer, positions [0, gpu_tokens) of every sequence stay on the device and the rest go to host memory
(``TieredKVCache``): the oldest keys are the ones every later query reads, so they get the fast tier, and a
growing sequence spills its newest tokens to the host. The host tier's layout, memory and CPU attention are
host_tier.py's, its streaming to the device host_stream.py's, the plan (split, chunk, rates) offload_plan.py's.
Attention runs where the keys are, partial results over disjoint keys merged exactly by their log-sum-exp:

* prefill, in chunks of the sequence (the plan's chunk: activations stay bounded at any length): a chunk whose
  keys all sit on the device is one attention call; otherwise it attends the device tier's keys, its own keys
  beyond it, and the host keys before it, streamed to the device in units (the copy engine fills a ring of
  slots while earlier units and the next layer compute; a chunk of C queries does C times more work per key
  than the copy costs, so prefill never attends the host tier on the CPU). A chunk's own host keys are written
  by device-to-host copies on a write stream; streamed reads wait for them on the device, never on the host.
* decode, per layer, four parts at once: the device tier by the split-K kernel; the newest token from the
  registers it was computed in; the host tier split at the plan's ``decode_cpu_share``: the newer part attended
  by the compiled CPU kernel on a worker thread (only a query and a partial result cross PCIe), the older part
  streamed to the device (prefetched while the layer before computes: streaming does not need the query).
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..attention import kernel_for, run_kernel
from ..attention.cudnn_split import merge as merge_into
from ..attention.decode import decode_attention
from ..attention.host_decode import compiled_kernel
from ..masks import Mask
from .host_stream import HostStream, Unit
from .host_tier import (Fold, HostArena, Range, arena_bytes, cpu_range_attention, fold, fold_lengths, merge_stacked,
                        no_keys, scatter_tokens, write_positions)
from .offload_plan import (DEFAULT_PREFILL_CHUNK, GIB, STREAM_SLOTS, CacheSizing, OffloadPlan, cpu_threads,
                           host_block_tokens, host_memory_bytes, kv_bytes_per_token, measure_rates,
                           stream_unit_blocks)

NEG_LSE = -1e30   # a part without keys, as a finite log-sum-exp: merges then never see -inf minus -inf


def log_offload_plan(plan: OffloadPlan) -> None:
    logging.getLogger("fastattn_dist").warning("%s", plan.describe())


@dataclass
class TierTiming:
    """Busy time of each tier's attention over timed decode steps (bench-model): the CPU kernel's wall time on the
    worker, the copy engine's time on the streamed units, the device tier's kernels (CUDA events)."""

    steps: int = 0
    cpu_s: float = 0.0
    device_events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)
    device_s: float = 0.0

    def device_seconds(self) -> float:
        if self.device_events:
            self.device_events[-1][1].synchronize()
        return self.device_s + sum(a.elapsed_time(b) for a, b in self.device_events) / 1e3


# -- the tiered cache ----------------------------------------------------------------------------------------
class TieredKVCache:
    """Per layer ``[batch, gpu_tokens, kv_heads, head_dim]`` on the device and ``[blocks, batch, kv_heads,
    block_tokens, head_dim]`` in host memory (host_tier.py; pinned when the device is a GPU). ``lengths`` on the
    device as in KVCache, and ``host_lengths`` on the host (an offloaded decode reads them there)."""

    def __init__(self, num_layers: int, batch: int, max_seq_len: int, gpu_tokens: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, *, block_tokens: Optional[int] = None,
                 unit_blocks: Optional[int] = None, slots: int = STREAM_SLOTS) -> None:
        self.batch, self.max_seq_len, self.gpu_tokens = batch, max_seq_len, gpu_tokens
        host_tokens = max_seq_len - gpu_tokens
        T = self.block_tokens = block_tokens or host_block_tokens(host_tokens)
        blocks = -(-host_tokens // T)
        cuda = device.type == "cuda"
        self.k = [torch.zeros(batch, gpu_tokens, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(batch, gpu_tokens, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        elem = torch.empty(0, dtype=dtype).element_size()
        self.arena = HostArena(arena_bytes(num_layers, blocks, batch, kv_heads, T, head_dim, elem), pin=cuda)
        shape = (blocks, batch, kv_heads, T, head_dim)
        self.host_k = [self.arena.take(shape, dtype) for _ in range(num_layers)]
        self.host_v = [self.arena.take(shape, dtype) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self.host_lengths = [0] * batch
        self.device = device
        self.write_stream = torch.cuda.Stream(device) if cuda else None
        self.written = [[0] * batch for _ in range(num_layers)]   # host positions whose writes are enqueued
        self.stream = HostStream(self.host_k, self.host_v, self.written,
                                 unit_blocks or stream_unit_blocks(host_tokens), slots, device, self.write_stream)
        # decode: each step's new host tokens, staged in (pinned) host memory, scattered into the tier at its end
        self.staged = torch.zeros(num_layers, 2, batch, kv_heads, head_dim, dtype=dtype, pin_memory=cuda)
        self.query = torch.zeros(batch, 1, 0, head_dim, dtype=dtype)   # sized at the first decode step
        self._pending: Dict[int, List[Optional[int]]] = {}
        self._staged_event: Optional[torch.cuda.Event] = None
        self._writes_pending = False
        self.timing: Optional[TierTiming] = None
        self.cpu_threads = cpu_threads()
        compiled_kernel()  # the CPU decode kernel is built (or loaded) with the cache, not in a decode step

    @property
    def gpu_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host_k + self.host_v)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def reset(self) -> None:
        self.lengths.zero_()
        self.host_lengths = [0] * self.batch
        for w in self.written:
            w[:] = [0] * self.batch
        self.stream.clear()
        self.stream.timing = False  # a prefill's copies are not decode's
        self._pending.clear()

    def close(self) -> None:
        """Wait for the write and fetch streams' copies: the device slots and pinned host blocks they read and write
        must not be given back (and reused) under a copy still running."""
        for stream in (self.write_stream, self.stream.fetch_stream):
            if stream is not None:
                stream.synchronize()

    def set_lengths(self, lengths: List[int]) -> None:
        self.host_lengths = list(lengths)
        self.lengths.copy_(torch.tensor(lengths))

    # -- writes -----------------------------------------------------------------------------------------------
    def write_block(self, layer: int, b0: int, b1: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values ``[b1 - b0, n, H, D]`` at positions [start, start + n): the device part in place, the host
        part by asynchronous copies on the write stream (streamed reads wait for them on the device)."""
        n, g = k.shape[1], self.gpu_tokens
        cut = max(0, min(n, g - start))
        if cut:
            self.k[layer][b0:b1, start:start + cut] = k[:, :cut]
            self.v[layer][b0:b1, start:start + cut] = v[:, :cut]
        if cut == n:
            return
        h0 = start + cut - g
        if self.write_stream is None:
            write_positions(self.host_k[layer], b0, h0, k[:, cut:], False)
            write_positions(self.host_v[layer], b0, h0, v[:, cut:], False)
        else:
            self.write_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.write_stream):
                write_positions(self.host_k[layer], b0, h0, k[:, cut:], True)
                write_positions(self.host_v[layer], b0, h0, v[:, cut:], True)
            for t in (k, v):
                t.record_stream(self.write_stream)
            self._writes_pending = True
        for b in range(b0, b1):
            self.written[layer][b] = max(self.written[layer][b], h0 + n - cut)

    def append_token(self, layer: int, k: torch.Tensor, v: torch.Tensor, split: "DecodeSplit") -> None:
        """One new token per sequence ``[batch, 1, H, D]`` at position lens[b] - 1: into the device tier in place,
        or staged for the host tier (scattered there by ``flush`` at the step's end)."""
        if split.dev_rows is not None:
            rows, pos = split.dev_rows
            self.k[layer].index_put_((rows, pos), k[rows, 0])
            self.v[layer].index_put_((rows, pos), v[rows, 0])
        if any(p is not None for p in split.newest_host):
            self.staged[layer, 0].copy_(k[:, 0], non_blocking=True)
            self.staged[layer, 1].copy_(v[:, 0], non_blocking=True)
            self._pending[layer] = split.newest_host
            if self.device.type == "cuda":
                self._staged_event = torch.cuda.Event()
                self._staged_event.record()

    def flush(self) -> None:
        """Make every write readable on the host: prefill's device-to-host copies done, decode's staged tokens
        scattered into the tier (then they may be streamed or attended on the CPU)."""
        if self._writes_pending:
            self.write_stream.synchronize()
            self._writes_pending = False
        if not self._pending:
            return
        if self._staged_event is not None:
            self._staged_event.synchronize()
        for layer, positions in self._pending.items():
            scatter_tokens(self.host_k[layer], self.staged[layer, 0], positions)
            scatter_tokens(self.host_v[layer], self.staged[layer, 1], positions)
            for b, p in enumerate(positions):
                if p is not None:
                    self.written[layer][b] = max(self.written[layer][b], p + 1)
        self._pending.clear()

    def stage_query(self, q: torch.Tensor):
        """``q`` in host memory for the CPU part, and the event its copy completes at (None on CPU)."""
        if self.device.type != "cuda":
            return q, None
        if self.query.shape != q.shape:
            self.query = torch.empty(q.shape, dtype=q.dtype, pin_memory=True)
        self.query.copy_(q, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return self.query, ev

    def layer(self, i: int, prefill_host: str = "stream") -> "TieredLayerKV":
        """Layer i as the attention sublayer's KV sink."""
        return TieredLayerKV(self, i)


# -- prefill ---------------------------------------------------------------------------------------------------
class Partials:
    """Partial attention results over disjoint keys, merged into ``out`` (the query's dtype) as they come: one pass
    per part on GPUs (attention/cudnn_split.merge), with the running log-sum-exp beside it."""

    def __init__(self, q: torch.Tensor, out: Optional[torch.Tensor]) -> None:
        self.out = out if out is not None else torch.empty_like(q)
        self.lse: Optional[torch.Tensor] = None

    def add(self, o: torch.Tensor, lse: torch.Tensor, r0: int = 0) -> None:
        """``o`` ``[B, S - r0, H, D]``, ``lse`` ``[B, H, S - r0]``: the part of query rows r0.."""
        lse = lse.float().clamp(min=NEG_LSE)
        if self.lse is None:
            B, S, H, _ = self.out.shape
            self.lse = torch.full((B, H, S), NEG_LSE, device=lse.device)
            if r0 == 0:
                self.out.copy_(o)
                self.lse.copy_(lse)
                return
            self.out.zero_()
        dst, dst_lse = self.out[:, r0:], self.lse[:, :, r0:]
        merge_into(dst, dst, dst_lse, o, lse)
        dst_lse.copy_(torch.logaddexp(dst_lse, lse))


def part_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, q_offset: int, backend="auto"):
    """(o, lse) of queries against one part of the keys (positions relative to the part's first key). A part may
    hold no visible key for some sequences (key length 0): their rows give 0 and an lse of -inf."""
    which = kernel_for(backend, q, k, mask, q_offset, True)
    return run_kernel(which, q, k, v, mask, q_offset=q_offset, return_lse=True)


def _part_mask(causal: bool, window: Optional[int], lengths: Optional[torch.Tensor], k0: int, n: int) -> Mask:
    """The mask of key positions [k0, k0 + n) relative to k0 (key lengths shifted and clamped)."""
    kl = None
    if lengths is not None:
        kl = (lengths - k0).clamp(0, n)
    return Mask(causal, window, kl)


class TieredLayerKV:
    """One layer of a two-tier cache as a KV sink (kv.py): a prefill tile's keys go to the tier their positions
    fall in, and its queries attend to both tiers and its own keys, merged by LSE."""

    def __init__(self, cache: TieredKVCache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    def write(self, b0, b1, start, k, v):
        self.cache.write_block(self.layer, b0, b1, start, k, v)

    def attend_written(self, q, k, v, b0, b1, start, mask, backend, out=None):
        return tiered_chunk_attention(self.cache, self.layer, b0, b1, q, k, v, start, mask.key_lengths, mask.window,
                                      out=out, backend=backend)


def tiered_chunk_attention(cache: TieredKVCache, layer: int, b0: int, b1: int, q: torch.Tensor, own_k: torch.Tensor,
                           own_v: torch.Tensor, p0: int, lengths: Optional[torch.Tensor], window: Optional[int],
                           out: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Attention of a prefill chunk ``q`` ``[b1 - b0, C, Hq, D]`` (sequences b0..b1-1) at positions p0.. over every
    key before and in it: the device tier's (its own keys there included), its own keys beyond it, and the host
    tier's before it (streamed), merged by LSE. ``lengths``: the sequences' real lengths (right padding), or None."""
    C, g = q.shape[1], cache.gpu_tokens
    dev_k, dev_v = cache.k[layer][b0:b1], cache.v[layer][b0:b1]
    if p0 + C <= g:  # every key on the device: one call, as a one-tier cache
        m = _part_mask(True, window, lengths, 0, p0 + C)
        keys, vals = dev_k[:, :p0 + C], dev_v[:, :p0 + C]
        return run_kernel(kernel_for(backend, q, keys, m, p0, False), q, keys, vals, m, q_offset=p0, out=out)
    acc = Partials(q, out)
    k0 = 0 if window is None else max(0, p0 - window + 1)
    if k0 < g:
        m = _part_mask(True, window, lengths, k0, g - k0)
        acc.add(*part_attention(q, dev_k[:, k0:g], dev_v[:, k0:g], m, p0 - k0, backend))
    r0 = max(p0, g) - p0  # query rows from the device tier's end on see their own keys beyond it
    m = _part_mask(True, window, lengths, p0 + r0, C - r0)
    acc.add(*part_attention(q[:, r0:], own_k[:, r0:], own_v[:, r0:], m, 0, backend), r0)
    lo = (g if window is None else max(g, p0 - window + 1)) - g
    if lo < p0 - g:
        _stream_prefix(cache, layer, b0, b1, q, p0, lo, p0 - g, lengths, window, acc, backend)
    return acc.out


def _stream_prefix(cache: TieredKVCache, layer: int, b0: int, b1: int, q: torch.Tensor, p0: int, lo: int, hi: int,
                   lengths, window, acc: Partials, backend: str) -> None:
    """Host positions [lo, hi) of sequences b0..b1-1 streamed unit by unit (each transposed once on the device to
    the prefill kernels' token-major layout) and attended; then the next layer's same range is prefetched."""
    T, g, n = cache.block_tokens, cache.gpu_tokens, b1 - b0
    need = [hi] * n

    def work(kb: torch.Tensor, vb: torch.Tensor, unit: Unit) -> None:
        j0, j1 = unit[3], unit[4]
        a, z = max(lo, j0 * T), min(hi, j1 * T)
        kt = kb.permute(1, 0, 3, 2, 4).reshape(n, (j1 - j0) * T, kb.shape[2], kb.shape[4])[:, a - j0 * T:z - j0 * T]
        vt = vb.permute(1, 0, 3, 2, 4).reshape(n, (j1 - j0) * T, vb.shape[2], vb.shape[4])[:, a - j0 * T:z - j0 * T]
        acc.add(*part_attention(q, kt, vt, _part_mask(True, window, lengths, g + a, z - a), p0 - g - a, backend))
    s = cache.stream
    s.consume(s.units(layer, b0, b1, lo // T, -(-hi // T)), need, work)
    if layer + 1 < cache.num_layers:
        s.prefetch(s.units(layer + 1, b0, b1, lo // T, -(-hi // T)), need)


# -- decode ----------------------------------------------------------------------------------------------------
@dataclass
class DecodeSplit:
    """Where each sequence's keys go in one decode step (the same for every layer): device keys [dev_lo, dev_end),
    the newest token from its registers, host keys streamed (``stream``, block-aligned starts) and on the CPU
    (``cpu``); positions of the host tier are host-local."""

    lens: List[int]
    dev_lo: List[int]
    dev_end: List[int]
    stream: List[Range]
    cpu: List[List[Range]]
    newest_host: List[Optional[int]]
    share: float = 1.0                                             # the CPU's share it was made for
    dev_rows: Optional[Tuple[torch.Tensor, torch.Tensor]] = None   # (rows, positions) of new device tokens
    dev_len: Optional[torch.Tensor] = None                         # dev_end on the device (no window)
    unit_span: Tuple[int, int] = (0, 0)                            # host blocks [j0, j1) the stream part reads
    unit_lens: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    cpu_fold: Optional[Fold] = None                                # fold_lengths(cpu): the CPU part's calls

    @property
    def has_cpu(self) -> bool:
        return any(e > s for rs in self.cpu for s, e in rs)


def decode_split(cache: TieredKVCache, lens: Sequence[int], window: Optional[int], cpu_share: float) -> DecodeSplit:
    """The split of a decode step with ``lens[b]`` keys per sequence (the new one included): of each sequence's host
    keys (its newest excepted) the older ``1 - cpu_share``, in whole blocks, stream; the rest go to the CPU."""
    g, T = cache.gpu_tokens, cache.block_tokens
    lo_all = [max(0, n - window) if window is not None else 0 for n in lens]
    split = DecodeSplit(list(lens), lo_all, [max(lo, min(n - 1, g)) for n, lo in zip(lens, lo_all)], [], [], [],
                        cpu_share)
    for n, lo in zip(lens, lo_all):
        hs, e = max(lo, g) - g, n - 1 - g
        split.newest_host.append(e if e >= 0 else None)
        if e <= hs:
            split.stream.append((0, 0))
            split.cpu.append([])
            continue
        sa = min(e, -(-hs // T) * T)
        c = e if cpu_share <= 0 else sa + T * round((1 - cpu_share) * (e - hs) / T)
        c = max(sa, min(e, c))
        split.stream.append((sa, c))
        split.cpu.append([r for r in ((hs, sa), (c, e)) if r[1] > r[0]])
    _device_tensors(cache, split)
    return split


def _device_tensors(cache: TieredKVCache, split: DecodeSplit) -> None:
    """The split's lengths and rows as device tensors, made once per step."""
    dev = cache.device
    rows = [b for b, p in enumerate(split.newest_host) if p is None]
    if rows:
        split.dev_rows = (torch.tensor(rows, device=dev), torch.tensor([split.lens[b] - 1 for b in rows], device=dev))
    split.dev_len = torch.tensor(split.dev_end, device=dev)
    split.cpu_fold = fold_lengths(split.cpu, cache.block_tokens)
    j0, j1, lens, _ = fold_lengths([[r] for r in split.stream], cache.block_tokens)
    split.unit_span = (j0, j1)
    if lens is None:
        return
    for _, _, _, u0, u1 in cache.stream.units(0, 0, cache.batch, j0, j1):
        part = lens[u0 - j0:u1 - j0].reshape(-1)
        split.unit_lens[(u0, u1)] = (part.clamp(min=1).to(dev), (part == 0).to(dev))


def stream_units(cache: TieredKVCache, layer: int, split: DecodeSplit) -> List[Unit]:
    j0, j1 = split.unit_span
    return cache.stream.units(layer, 0, cache.batch, j0, j1) if j1 > j0 else []


def tiered_decode_attention(cache: TieredKVCache, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                            v_new: torch.Tensor, split: DecodeSplit, backend: str = "auto") -> torch.Tensor:
    """One new query per sequence ``[B, 1, Hq, D]`` against both tiers and its own key (``k_new``, ``v_new``
    ``[B, 1, Hkv, D]``): the CPU part submitted first (it runs on the worker while the device works), then the device
    tier, the newest token and the streamed units on the device, all merged by LSE."""
    fut = None
    if split.has_cpu:
        q_host, ready = cache.stage_query(q)
        fut = host_worker().submit(_cpu_part, cache, layer, q_host, ready, split)
    parts = [_timed_device_part(cache, layer, q, split, backend), _newest_part(q, k_new, v_new)]
    parts += _streamed_parts(cache, layer, q, split, backend)
    if fut is not None:
        parts.append(_to_device(fut.result(), q.device))
    o = torch.cat([p[0].float().reshape(-1, *q.shape) for p in parts])
    lse = torch.cat([p[1].float().reshape(-1, q.shape[0], q.shape[2], 1) for p in parts])
    return merge_stacked(o, lse)[0].to(q.dtype)


def _timed_device_part(cache: TieredKVCache, layer: int, q: torch.Tensor, split: DecodeSplit, backend: str):
    """``_device_part``, timed when the cache times its tiers (CUDA events on GPUs, the clock on CPU)."""
    timing = cache.timing
    if timing is None:
        return _device_part(cache, layer, q, split, backend)
    if q.device.type != "cuda":
        t0 = time.perf_counter()
        res = _device_part(cache, layer, q, split, backend)
        timing.device_s += time.perf_counter() - t0
        return res
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    res = _device_part(cache, layer, q, split, backend)
    end.record()
    timing.device_events.append((start, end))
    return res


def _device_part(cache: TieredKVCache, layer: int, q: torch.Tensor, split: DecodeSplit, backend: str):
    """The device tier's keys [dev_lo, dev_end) per sequence (its new token excluded: ``_newest_part`` has it)."""
    if not any(split.dev_lo):
        return decode_attention(q, cache.k[layer], cache.v[layer], split.dev_len, backend=backend, return_lse=True)
    B, _, Hq, D = q.shape
    o, lse = no_keys(B, Hq, D, q.device)
    full = Mask(False, None, None)
    for b, (lo, end) in enumerate(zip(split.dev_lo, split.dev_end)):  # a window: per sequence
        if end > lo:
            o[b:b + 1], lse[b:b + 1] = part_attention(q[b:b + 1], cache.k[layer][b:b + 1, lo:end],
                                                      cache.v[layer][b:b + 1, lo:end], full, 0, backend)
    return o, lse


def _newest_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Attention to the one newest key alone: its value, and the scaled score as the log-sum-exp."""
    G = q.shape[2] // k.shape[2]
    kq, vq = k.repeat_interleave(G, dim=2).float(), v.repeat_interleave(G, dim=2).float()
    s = (q.float() * kq).sum(-1) * q.shape[3] ** -0.5        # [B, 1, Hq]
    return vq, s.transpose(1, 2)


def _streamed_parts(cache: TieredKVCache, layer: int, q: torch.Tensor, split: DecodeSplit, backend: str):
    """The stream part: each unit's blocks of every sequence folded into the split-K kernel's batch; then the next
    layer's units are prefetched into the slots that free up."""
    units = stream_units(cache, layer, split)
    if not units:
        return []
    B, _, Hq, D = q.shape
    out, need = [], [c for _, c in split.stream]

    def work(kb: torch.Tensor, vb: torch.Tensor, unit: Unit) -> None:
        lens, empty = split.unit_lens[(unit[3], unit[4])]
        nb = kb.shape[0]
        o, lse = decode_attention(q.repeat(nb, 1, 1, 1), fold(kb), fold(vb), lens, backend=backend, return_lse=True)
        out.append((o, lse.masked_fill(empty[:, None, None], float("-inf"))))
    cache.stream.consume(units, need, work)
    if layer + 1 < cache.num_layers:  # the copy engine keeps moving while the CPU part of this layer runs
        cache.stream.prefetch(stream_units(cache, layer + 1, split), need)
    return out


def _to_device(part, device: torch.device):
    """The CPU part's (out, lse) on ``device`` without a host wait (pinned, then an asynchronous copy: from pageable
    memory CUDA would first wait for the stream's queued work)."""
    if device.type != "cuda":
        return part
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in part)


def _cpu_part(cache: TieredKVCache, layer: int, q_host: torch.Tensor, ready, split: DecodeSplit):
    t0 = time.perf_counter()
    if ready is not None:
        ready.synchronize()
    res = cpu_range_attention(q_host, cache.host_k[layer], cache.host_v[layer], split.cpu, cache.cpu_threads,
                              split.cpu_fold)
    if cache.timing is not None:
        cache.timing.cpu_s += time.perf_counter() - t0
    return res


_WORKER: Optional[concurrent.futures.ThreadPoolExecutor] = None


def host_worker() -> concurrent.futures.ThreadPoolExecutor:
    """The thread that attends the host tier while the calling thread drives the device."""
    global _WORKER
    if _WORKER is None:
        _WORKER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastattn-host-kv")
    return _WORKER


__all__ = ["TieredKVCache", "TieredLayerKV", "OffloadPlan", "CacheSizing", "DecodeSplit", "TierTiming",
           "decode_split", "tiered_chunk_attention", "tiered_decode_attention", "part_attention", "host_worker",
           "log_offload_plan", "kv_bytes_per_token", "measure_rates", "host_memory_bytes", "DEFAULT_PREFILL_CHUNK",
           "GIB"]
