"""Long context beyond GPU memory: the KV cache split between the device and (pinned) host memory.

Per layer, positions [0, gpu_tokens) of every sequence stay on the device and the rest go to host
memory (``TieredKVCache``): the oldest keys are the ones every later query reads, so they get the fast
tier, and a growing sequence spills its newest tokens to the host. Attention runs where the keys are:

* prefill, in chunks of the sequence (activations stay bounded at any length): a chunk attends to its
  own keys (causal), the device tier's, and the host tier's; on a GPU host keys are streamed to the device
  in blocks (double-buffered on a copy stream, the next block copying while the current one is attended:
  a chunk of C queries does C times more work per key than the copy costs, so the CPU never wins here),
  without one they are attended on the CPU; new keys of the host tier are written by asynchronous copies
  on the copy stream, overlapped with compute.
* decode: the device tier on the device while a worker thread attends the host tier on the CPU (only a
  query and a partial result cross PCIe), or host blocks streamed to the device, by the same plan.
Partial results over disjoint keys are merged exactly by their log-sum-exp (``merge``).

``OffloadPlan.decide`` picks the split ("auto": from free device memory and a host budget; "off"; or a
token count) and measures, once per process and device, the host-to-device copy rate and the CPU's
attention rate to choose between streaming and CPU attention for decode. The default host budget is
80% of the host memory available, shared by the ranks of this node. On CPU-only runs both tiers are CPU
tensors (tests).
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..attention import kernel_for, run_kernel, tiled_attention
from ..attention.decode import decode_attention
from ..masks import Mask
from ..parallel.process_group import local_ranks

GIB = 1 << 30
DEFAULT_PREFILL_CHUNK = 8192   # prefill chunk with a host tier: activations bounded, host keys streamed per chunk
STREAM_BLOCK_TOKENS = 16384    # host keys streamed to the device per block (two blocks in flight)
ALLOCATOR_SLACK_BYTES = 2 * GIB  # kept free beside the cache: allocator fragmentation, library workspaces


def kv_bytes_per_token(shape, num_layers: int, elem_bytes: int) -> int:
    """K and V of one position of one sequence, all layers, on this rank (``shape``: the model's TPShape)."""
    return 2 * num_layers * shape.local_kv_heads * shape.head_dim * elem_bytes


def reserve_bytes(shape, num_layers: int, elem_bytes: int, prefill_chunk: Optional[int] = None) -> int:
    """Device memory a KV cache must leave free: one prefill chunk's activations (the residual stream, a
    sublayer's output and its normalised input, q/k/v, the MLP's gate/up and activation, in the model dtype), the
    streamed host blocks of one layer, and the allocator's slack."""
    chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK
    qkv = (shape.local_heads + 2 * shape.local_kv_heads) * shape.head_dim
    acts = chunk * (6 * shape.hidden_size + 4 * shape.local_intermediate + 4 * qkv) * elem_bytes
    streamed = 2 * STREAM_BLOCK_TOKENS * kv_bytes_per_token(shape, num_layers, elem_bytes) // num_layers
    return acts + streamed + ALLOCATOR_SLACK_BYTES


def host_memory_bytes() -> int:
    """Memory available to this process now (MemAvailable), or 0 when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class OffloadPlan:
    """Where the KV cache lives and where host-tier attention runs."""

    gpu_tokens: int          # positions per sequence on the device (== max_seq_len: no offload)
    max_seq_len: int
    bytes_per_token: int     # K and V of one position of one sequence, all layers
    prefill_host: str        # "stream" or "cpu": how a prefill chunk attends to the host tier
    decode_host: str         # "stream" or "cpu": how a decode step does
    pcie_gbps: float = 0.0   # measured host -> device copy rate
    cpu_gbps: float = 0.0    # measured CPU attention rate, bytes of K/V per second
    why: str = ""

    @property
    def offloaded(self) -> bool:
        return self.gpu_tokens < self.max_seq_len

    def describe(self) -> str:
        if not self.offloaded:
            return f"KV cache on the device ({self.max_seq_len} tokens x {self.bytes_per_token / 1024:.0f} KiB)"
        host = self.max_seq_len - self.gpu_tokens
        return (f"KV cache: {self.gpu_tokens} tokens on the device ({self.gpu_tokens * self.bytes_per_token / GIB:.1f} "
                f"GiB), {host} on the host ({host * self.bytes_per_token / GIB:.1f} GiB); host-tier attention: "
                f"prefill {self.prefill_host}, decode {self.decode_host} (measured: "
                + (f"host->device {self.pcie_gbps:.1f} GB/s, " if self.pcie_gbps > 0 else "")
                + f"CPU attention {self.cpu_gbps:.1f} GB/s of K/V). {self.why}")

    @staticmethod
    def check_mode(mode, device: torch.device) -> None:
        """``mode`` is "off", "auto" or a token count >= 1, and "auto" has a GPU to split against."""
        if mode not in ("off", "auto") and (isinstance(mode, bool) or not isinstance(mode, int) or mode < 1):
            raise ValueError(f"kv_offload must be 'auto', 'off' or a number of tokens on the device, got {mode!r}")
        if mode == "auto" and device.type != "cuda":
            raise ValueError("kv_offload='auto' splits the KV cache between a GPU and host memory: this model is on "
                             f"{device.type}; use a GPU (or give a token count to split a CPU cache, for tests)")

    @classmethod
    def decide(cls, mode, *, max_seq_len: int, batch: int, bytes_per_token: int, device: torch.device,
               host_budget_bytes: Optional[int] = None, reserve_bytes: int = 0, measure: bool = True) -> "OffloadPlan":
        """``mode``: "off", "auto" or a number of device tokens. Raises ValueError, before any large
        allocation, when the cache cannot fit: offload on a CPU-only run, a host budget too small, a context
        over both tiers."""
        need = max_seq_len * batch * bytes_per_token
        if mode == "off":
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                if need > free - reserve_bytes:
                    raise ValueError(f"the KV cache needs {need / GIB:.1f} GiB for {max_seq_len} tokens x {batch} "
                                     f"sequences; {device} has {free / GIB:.1f} GiB free ({reserve_bytes / GIB:.1f} "
                                     "kept for activations): use kv_offload='auto' or a shorter context")
            return cls(max_seq_len, max_seq_len, bytes_per_token, "stream", "cpu", why="offload off")
        if device.type != "cuda" and mode == "auto":
            return cls(max_seq_len, max_seq_len, bytes_per_token, "stream", "cpu", why="no GPU: one tier")
        if isinstance(mode, bool) or not (mode == "auto" or isinstance(mode, int)):
            raise ValueError(f"kv_offload must be 'auto', 'off' or a number of device tokens, got {mode!r}")
        if mode == "auto":
            free, _ = torch.cuda.mem_get_info(device)
            fit = max(0, free - reserve_bytes) // (batch * bytes_per_token)
            if fit >= max_seq_len:
                return cls(max_seq_len, max_seq_len, bytes_per_token, "stream", "cpu",
                           why=f"auto: the whole cache fits the device ({need / GIB:.1f} GiB of {free / GIB:.1f} free)")
            gpu_tokens = int(fit)
            why = (f"auto: {free / GIB:.1f} GiB free on the device, {reserve_bytes / GIB:.1f} GiB kept for "
                   f"activations: {gpu_tokens} tokens there")
        else:
            if mode < 1:
                raise ValueError(f"kv_offload tokens on the device must be >= 1, got {mode}")
            gpu_tokens = min(mode, max_seq_len)
            why = f"{gpu_tokens} tokens on the device as asked"
        if gpu_tokens < 1:
            raise ValueError(f"no room for the KV cache on {device}: free memory is below the {reserve_bytes / GIB:.1f} "
                             "GiB kept for activations")
        host_need = (max_seq_len - gpu_tokens) * batch * bytes_per_token
        # the ranks of a node share its memory: each takes its share of the default budget
        budget = host_budget_bytes if host_budget_bytes is not None else int(0.8 * host_memory_bytes()) // local_ranks()
        if host_need > budget:
            raise ValueError(f"the KV cache's host tier needs {host_need / GIB:.1f} GiB for {max_seq_len} tokens x "
                             f"{batch} sequences, over the host budget of {budget / GIB:.1f} GiB: lower the context "
                             f"or raise the budget (the context both tiers can hold is about "
                             f"{gpu_tokens + budget // (batch * bytes_per_token)} tokens)")
        plan = cls(gpu_tokens, max_seq_len, bytes_per_token, "stream", "cpu", why=why)
        if measure:
            plan.pcie_gbps, plan.cpu_gbps = measure_rates(device)
            # decode reads each host key once per step: the faster reader wins; a prefill chunk does C x more
            # work per key on the CPU than a copy costs, so it streams unless copies are unavailable
            plan.decode_host = "cpu" if plan.cpu_gbps >= plan.pcie_gbps or device.type != "cuda" else "stream"
            plan.prefill_host = "stream" if device.type == "cuda" else "cpu"
        return plan


def log_offload_plan(plan: OffloadPlan) -> None:
    logging.getLogger("fastattn_dist").warning("%s", plan.describe())


_RATES: dict = {}  # device -> measured rates: a cache made again later does not measure again


def measure_rates(device: torch.device, mb: Optional[int] = None) -> Tuple[float, float]:
    """(host -> device copy GB/s from pinned memory, CPU decode-attention GB/s of K/V): a few milliseconds,
    once per process and device."""
    key = str(device)
    if key not in _RATES:
        _RATES[key] = _measure_rates(device, mb)
    return _RATES[key]


def _measure_rates(device: torch.device, mb: Optional[int] = None) -> Tuple[float, float]:
    mb = mb or (256 if device.type == "cuda" else 16)
    pcie = 0.0
    if device.type == "cuda":
        src = torch.empty(mb << 20, dtype=torch.uint8).pin_memory()
        dst = torch.empty_like(src, device=device)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        pcie = (mb << 20) / (time.perf_counter() - t0) / 1e9
        del src, dst
    H, D, L = 8, 128, (mb << 20) // (2 * 8 * 128 * 2)
    k = torch.randn(1, L, H, D).to(torch.bfloat16)
    q = torch.randn(1, 1, H, D).to(torch.bfloat16)
    host_attention(q, k, k, Mask(False, None, None), 0)
    t0 = time.perf_counter()
    host_attention(q, k, k, Mask(False, None, None), 0)
    cpu = 2 * k.numel() * k.element_size() / (time.perf_counter() - t0) / 1e9
    return pcie, cpu


# -- the tiered cache ----------------------------------------------------------------------------------------
class TieredKVCache:
    """Per layer ``[batch, gpu_tokens, kv_heads, head_dim]`` on the device and ``[batch, max_seq_len - gpu_tokens,
    kv_heads, head_dim]`` in host memory (pinned when the device is a GPU). ``lengths`` on the device as in
    KVCache, and ``host_lengths`` on the host (an offloaded decode reads them there)."""

    def __init__(self, num_layers: int, batch: int, max_seq_len: int, gpu_tokens: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.batch, self.max_seq_len, self.gpu_tokens = batch, max_seq_len, gpu_tokens
        host_tokens = max_seq_len - gpu_tokens
        pin = device.type == "cuda"

        def host(shape):
            t = torch.zeros(shape, dtype=dtype)
            return t.pin_memory() if pin else t
        self.k = [torch.zeros(batch, gpu_tokens, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(batch, gpu_tokens, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.host_k = [host((batch, host_tokens, kv_heads, head_dim)) for _ in range(num_layers)]
        self.host_v = [host((batch, host_tokens, kv_heads, head_dim)) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self.host_lengths = [0] * batch
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._written: List[Optional[torch.cuda.Event]] = [None] * num_layers

    @property
    def gpu_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host_k + self.host_v)

    def reset(self) -> None:
        self.lengths.zero_()
        self.host_lengths = [0] * self.batch

    def set_lengths(self, lengths: List[int]) -> None:
        self.host_lengths = list(lengths)
        self.lengths.copy_(torch.tensor(lengths))

    def write_block(self, layer: int, b0: int, b1: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values ``[b1 - b0, n, H, D]`` at positions [start, start + n): the device part in place, the host
        part by an asynchronous copy on the copy stream (``host_ready`` orders readers after it)."""
        n, g = k.shape[1], self.gpu_tokens
        cut = max(0, min(n, g - start))
        if cut:
            self.k[layer][b0:b1, start:start + cut] = k[:, :cut]
            self.v[layer][b0:b1, start:start + cut] = v[:, :cut]
        if cut == n:
            return
        h0 = start + cut - g
        dk, dv = self.host_k[layer][b0:b1, h0:h0 + n - cut], self.host_v[layer][b0:b1, h0:h0 + n - cut]
        if self.copy_stream is None:
            dk.copy_(k[:, cut:])
            dv.copy_(v[:, cut:])
            return
        src_k, src_v = k[:, cut:].contiguous(), v[:, cut:].contiguous()
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            dk.copy_(src_k, non_blocking=True)
            dv.copy_(src_v, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        for t in (src_k, src_v):
            t.record_stream(self.copy_stream)
        self._written[layer] = ev

    def layer(self, i: int, prefill_host: str) -> "TieredLayerKV":
        """Layer i as the attention sublayer's KV sink; ``prefill_host``: how a chunk attends the host tier."""
        return TieredLayerKV(self, i, prefill_host)

    def host_ready(self, layer: int) -> None:
        """Wait (host side) until this layer's host tier holds everything written so far."""
        ev = self._written[layer]
        if ev is not None:
            ev.synchronize()
            self._written[layer] = None


# -- attention over tiers --------------------------------------------------------------------------------------
def merge(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Exact softmax mix of two partial results over disjoint keys: o ``[B, S, H, D]``, lse ``[B, H, S]``
    (natural log, -inf for a row that saw no key in that part). Returns (o, lse); o in float32."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    s = wa + wb
    o = (o_a.float() * wa.transpose(1, 2)[..., None] + o_b.float() * wb.transpose(1, 2)[..., None]) \
        / torch.where(s == 0, torch.ones_like(s), s).transpose(1, 2)[..., None]
    return o, torch.where(s == 0, torch.full_like(s, float("-inf")), m + torch.log(s))


def part_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, q_offset: int):
    """(o, lse) of queries against one part of the keys (positions relative to the part's first key). A part may
    hold no visible key for some sequences (key length 0): their rows give 0 and an lse of -inf."""
    which = kernel_for("auto", q, k, mask, q_offset, True)
    return run_kernel(which, q, k, v, mask, q_offset=q_offset, return_lse=True)


def host_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, q_offset: int):
    """The host tier attended on the CPU (``q`` and the result are CPU tensors): (o float32, lse)."""
    return tiled_attention(q, k, v, mask, q_offset=q_offset, return_lse=True, block_q=128, block_k=4096)


_WORKER: Optional[concurrent.futures.ThreadPoolExecutor] = None


def host_worker() -> concurrent.futures.ThreadPoolExecutor:
    """The thread that attends the host tier while the calling thread drives the device."""
    global _WORKER
    if _WORKER is None:
        _WORKER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastattn-host-kv")
    return _WORKER


def _part_mask(causal: bool, window: Optional[int], lengths: Optional[torch.Tensor], k0: int, n: int) -> Mask:
    """The mask of key positions [k0, k0 + n) relative to k0 (key lengths shifted and clamped)."""
    kl = None
    if lengths is not None:
        kl = (lengths - k0).clamp(0, n)
    return Mask(causal, window, kl)


class TieredLayerKV:
    """One layer of a two-tier cache as a KV sink (kv.py): a prefill tile's keys go to the tier their positions
    fall in, and its queries attend to both tiers and its own keys, merged by LSE."""

    def __init__(self, cache: TieredKVCache, layer: int, prefill_host: str) -> None:
        self.cache, self.layer, self.mode = cache, layer, prefill_host

    def write(self, b0, b1, start, k, v):
        self.cache.write_block(self.layer, b0, b1, start, k, v)

    def attend_written(self, q, k, v, b0, b1, start, mask, backend, out=None):
        o = tiered_chunk_attention(self.cache, self.layer, b0, b1, q, k, v, start, mask.key_lengths, mask.window,
                                   self.mode).to(q.dtype)
        return o if out is None else out.copy_(o)


def tiered_chunk_attention(cache: TieredKVCache, layer: int, b0: int, b1: int, q: torch.Tensor, own_k: torch.Tensor,
                           own_v: torch.Tensor, p0: int, lengths: Optional[torch.Tensor], window: Optional[int],
                           mode: str, stream_tokens: int = STREAM_BLOCK_TOKENS) -> torch.Tensor:
    """Attention of a prefill chunk ``q`` ``[b1 - b0, C, Hq, D]`` (sequences b0..b1-1) at positions p0.. over every
    key before and in it: its own keys (causal), the device tier's and the host tier's (streamed or on the CPU),
    merged by LSE. ``lengths``: the sequences' real lengths (right padding), or None."""
    C = q.shape[1]
    g = cache.gpu_tokens
    dev_k, dev_v = cache.k[layer][b0:b1], cache.v[layer][b0:b1]
    host_k, host_v = cache.host_k[layer][b0:b1], cache.host_v[layer][b0:b1]
    o, lse = part_attention(q, own_k, own_v, _part_mask(True, window, lengths, p0, C), 0)
    dev_end = min(p0, g)
    if dev_end > 0 and (window is None or p0 - window < dev_end):
        k0 = 0 if window is None else max(0, p0 - window + 1)
        m = _part_mask(True, window, lengths, k0, dev_end - k0)
        o2, lse2 = part_attention(q, dev_k[:, k0:dev_end], dev_v[:, k0:dev_end], m, p0 - k0)
        o, lse = merge(o, lse, o2, lse2)
    if p0 <= g:
        return o
    h_lo = g if window is None else max(g, p0 - window + 1)
    if h_lo >= p0:
        return o
    cache.host_ready(layer)
    if mode == "cpu" or q.device.type != "cuda":
        m = _part_mask(True, window, None if lengths is None else lengths.cpu(), h_lo, p0 - h_lo)
        fut = host_worker().submit(host_attention, q.cpu(), host_k[:, h_lo - g:p0 - g], host_v[:, h_lo - g:p0 - g],
                                   m, p0 - h_lo)
        o2, lse2 = fut.result()
        return merge(o, lse, o2.to(q.device), lse2.to(q.device))[0]
    # stream host blocks to the device, the next block copying on the copy stream while this one is attended
    bufs, cur = [], torch.cuda.current_stream(q.device)
    blocks = [(s, min(p0, s + stream_tokens)) for s in range(h_lo, p0, stream_tokens)]

    def fetch(s, e):
        with torch.cuda.stream(cache.copy_stream):
            kb = host_k[:, s - g:e - g].to(q.device, non_blocking=True)
            vb = host_v[:, s - g:e - g].to(q.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        return kb, vb, ev
    bufs.append(fetch(*blocks[0]))
    for i, (s, e) in enumerate(blocks):
        if i + 1 < len(blocks):
            bufs.append(fetch(*blocks[i + 1]))
        kb, vb, ev = bufs[i]
        cur.wait_event(ev)
        for t in (kb, vb):
            t.record_stream(cur)
        o2, lse2 = part_attention(q, kb, vb, _part_mask(True, window, lengths, s, e - s), p0 - s)
        o, lse = merge(o, lse, o2, lse2)
        bufs[i] = None
    return o


def _windowed_decode(cache: TieredKVCache, layer: int, q: torch.Tensor, lens: List[int], window: int) -> torch.Tensor:
    """Sliding window: sequence b sees keys [n - window, n); each sequence attends its slice of each tier."""
    g = cache.gpu_tokens
    cache.host_ready(layer)
    out = torch.empty_like(q)
    full = Mask(False, None, None)
    for b, n in enumerate(lens):
        lo = max(0, n - window)
        parts = []
        if lo < min(n, g):
            parts.append(part_attention(q[b:b + 1], cache.k[layer][b:b + 1, lo:min(n, g)],
                                        cache.v[layer][b:b + 1, lo:min(n, g)], full, 0))
        if n > g:
            h0 = max(lo, g) - g
            kb = cache.host_k[layer][b:b + 1, h0:n - g].to(q.device)
            vb = cache.host_v[layer][b:b + 1, h0:n - g].to(q.device)
            parts.append(part_attention(q[b:b + 1], kb, vb, full, 0))
        o, lse = parts[0]
        for o2, lse2 in parts[1:]:
            o, lse = merge(o, lse, o2, lse2)
        out[b:b + 1] = o.to(q.dtype)
    return out


def tiered_decode_attention(cache: TieredKVCache, layer: int, q: torch.Tensor, lens: List[int], mode: str,
                            window: Optional[int], backend: str = "auto") -> torch.Tensor:
    """One new query per sequence ``[B, 1, Hq, D]`` against both tiers (``lens``: keys per sequence, the new one
    included): the device tier on the device while the worker attends the host tier on the CPU (or streamed)."""
    g = cache.gpu_tokens
    if window is not None:
        return _windowed_decode(cache, layer, q, lens, window)
    dev_len = torch.tensor([min(n, g) for n in lens], device=q.device)
    host_n = max(0, max(lens) - g)
    fut = None
    cache.host_ready(layer)  # the new token's keys may have just been copied there
    if host_n and (mode == "cpu" or q.device.type != "cuda"):
        kl = torch.tensor([max(0, n - g) for n in lens])
        fut = host_worker().submit(host_attention, q.cpu(), cache.host_k[layer][:, :host_n],
                                   cache.host_v[layer][:, :host_n], Mask(False, None, kl), 0)
    o, lse = decode_attention(q, cache.k[layer], cache.v[layer], dev_len, backend=backend, return_lse=True)
    if not host_n:
        return o
    if fut is not None:
        o2, lse2 = fut.result()
        return merge(o, lse, o2.to(q.device), lse2.to(q.device))[0].to(q.dtype)
    kl = torch.tensor([max(0, n - g) for n in lens], device=q.device)
    kb = cache.host_k[layer][:, :host_n].to(q.device, non_blocking=True)
    vb = cache.host_v[layer][:, :host_n].to(q.device, non_blocking=True)
    o2, lse2 = part_attention(q, kb, vb, Mask(False, None, kl), 0)
    return merge(o, lse, o2, lse2)[0].to(q.dtype)
