"""The host tier of a two-tier KV cache: its layout, its memory, its writes, and attention over it on the CPU.

Layout, per layer: ``[blocks, batch, kv_heads, block_tokens, head_dim]``, blocked head-major. Within a block of
``block_tokens`` positions each (sequence, kv head) keeps its keys as one contiguous run, and a run of blocks of
every sequence is one contiguous region. Three readers want exactly that:

* the CPU decode kernel (attention/host_decode.py) streams each head's keys contiguously: head-major measured
  0.70-0.73 of the memory's read bandwidth on 2 cores, key-major 0.52-0.69;
* the copy engine moves a range of blocks of every sequence to the device in one copy;
* on the device a block range is read through a strided view, blocks folded into the batch (``fold``): no
  transpose for decode, whose split-K kernel takes any strides; a prefill chunk transposes each streamed unit
  once on the device (a few percent of its copy time) for the prefill kernels' token-major layout.

Positions here are host-local (position - gpu_tokens). The memory is one zeroed buffer registered with CUDA as
pinned (``HostArena``): exact size, where torch's pinned allocator rounds each allocation up to a power of two.
"""
from __future__ import annotations

import logging
import weakref
from typing import List, Optional, Sequence, Tuple

import torch

from ..attention.host_decode import host_decode_attention

log = logging.getLogger("fastattn_dist")

Range = Tuple[int, int]   # host-local positions [start, end)


class HostArena:
    """One zeroed host buffer of ``nbytes``, registered with CUDA as pinned when ``pin`` (unregistered when the
    arena is collected, before the memory is freed); typed, shaped views are carved out of it in order."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.buffer = torch.zeros(max(1, nbytes), dtype=torch.uint8)
        self.offset = 0
        self.pinned = pin and _register(self.buffer)
        if self.pinned:
            weakref.finalize(self, _unregister, self.buffer)

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty(0, dtype=dtype).element_size()
        start = -(-self.offset // 64) * 64  # cache-line aligned
        if start + nbytes > self.buffer.numel():
            raise ValueError(f"the host arena holds {self.buffer.numel()} bytes: no room for {list(shape)} {dtype}")
        self.offset = start + nbytes
        return self.buffer[start:start + nbytes].view(dtype).view(*shape)


def _register(buf: torch.Tensor) -> bool:
    try:  # flag 1: cudaHostRegisterPortable, pinned for every CUDA context (as torch's own pinning helper)
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 1)
    except (RuntimeError, AttributeError, AssertionError) as e:
        log.warning("host KV tier: pinning failed (%s); copies from it are synchronous", e)
        return False
    if int(err) != 0:
        log.warning("host KV tier: cudaHostRegister of %.1f GiB failed (error %d); copies from it are synchronous",
                    buf.numel() / (1 << 30), int(err))
        return False
    return True


def _unregister(buf: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone already; the process frees the pages
        pass


def arena_bytes(layers: int, blocks: int, batch: int, kv_heads: int, block_tokens: int, head_dim: int,
                elem_bytes: int) -> int:
    """Bytes of a host tier (K and V of every layer), with the alignment ``HostArena.take`` adds."""
    one = blocks * batch * kv_heads * block_tokens * head_dim * elem_bytes
    return 2 * layers * (-(-one // 64) * 64)


# -- writes ------------------------------------------------------------------------------------------------------
def write_positions(host: torch.Tensor, b0: int, start: int, src: torch.Tensor, non_blocking: bool) -> None:
    """``src`` ``[n, L, Hkv, D]`` (token-major, any device) at host positions [start, start + L) of sequences
    b0..b0+n-1 of ``host`` ``[blocks, batch, Hkv, T, D]``. Every destination is contiguous, so a copy from a
    device is one DMA transfer without a host-side staging copy: a whole block is one copy per sequence range, a
    partial block one per (sequence, head); on the CPU each block is one strided copy."""
    n, L = src.shape[0], src.shape[1]
    T = host.shape[3]
    pos = start
    while pos < start + L:
        j, t0 = divmod(pos, T)
        t1 = min(T, t0 + start + L - pos)
        part = src[:, pos - start:pos - start + t1 - t0].transpose(1, 2)  # [n, Hkv, t1 - t0, D]
        if not src.is_cuda:
            host[j, b0:b0 + n, :, t0:t1].copy_(part)
        elif t1 - t0 == T:
            host[j, b0:b0 + n].copy_(part, non_blocking=non_blocking)
        else:
            for b in range(n):
                for h in range(host.shape[2]):
                    host[j, b0 + b, h, t0:t1].copy_(part[b, h], non_blocking=non_blocking)
        pos += t1 - t0


def scatter_tokens(host: torch.Tensor, staged: torch.Tensor, positions: Sequence[Optional[int]]) -> None:
    """One token per sequence from ``staged`` ``[batch, Hkv, D]`` (host memory) at host positions ``positions[b]``
    (None: that sequence's token went to the device tier)."""
    T = host.shape[3]
    rows = [b for b, p in enumerate(positions) if p is not None]
    if not rows:
        return
    blocks = torch.tensor([positions[b] // T for b in rows])
    offs = torch.tensor([positions[b] % T for b in rows])
    seqs = torch.tensor(rows)
    host[blocks, seqs, :, offs] = staged[seqs]


# -- folding block ranges into a batch -----------------------------------------------------------------------------
def fold_lengths(ranges: Sequence[Sequence[Range]], block_tokens: int) -> Tuple[int, int, Optional[torch.Tensor],
                                                                                List[Tuple[int, int, int, int]]]:
    """Split per-sequence host ranges into what a folded call reads and what it cannot.

    A folded call reads blocks [j0, j1) of every sequence as ``(j1 - j0) * batch`` virtual sequences (block-major),
    virtual sequence (j, b) attending keys [0, lens[j - j0, b]) of its block: it takes every range whose start is a
    block boundary. A range that starts inside a block gives that block's part to a ``sliced`` piece
    (b, j, t0, t1) and its rest to the folded call. Returns (j0, j1, lens int64 [j1 - j0, batch] or None, sliced)."""
    T, B = block_tokens, len(ranges)
    spans: List[Tuple[int, int, int]] = []   # (b, start, end), block-aligned start
    sliced: List[Tuple[int, int, int, int]] = []
    for b, rs in enumerate(ranges):
        for s, e in rs:
            if e <= s:
                continue
            if s % T:
                j, t0 = divmod(s, T)
                t1 = min(T, t0 + e - s)
                sliced.append((b, j, t0, t1))
                s += t1 - t0
            if s < e:
                spans.append((b, s, e))
    if not spans:
        return 0, 0, None, sliced
    j0 = min(s for _, s, _ in spans) // T
    j1 = max(-(-e // T) for _, _, e in spans)
    lens = torch.zeros(j1 - j0, B, dtype=torch.int64)
    for b, s, e in spans:
        for j in range(s // T, -(-e // T)):
            lens[j - j0, b] = min(T, e - j * T)
    return j0, j1, lens, sliced


def fold(blocks: torch.Tensor) -> torch.Tensor:
    """``[nblk, batch, Hkv, T, D]`` (contiguous over its first two dims) -> ``[nblk * batch, T, Hkv, D]``, a view."""
    nb, B, H, T, D = blocks.shape
    return blocks.reshape(nb * B, H, T, D).transpose(1, 2)


# -- merging partial results ------------------------------------------------------------------------------------
def merge_stacked(o: torch.Tensor, lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax mix of ``P`` partial results over disjoint keys: ``o`` ``[P, B, S, H, D]``, ``lse``
    ``[P, B, H, S]`` (natural log, -inf for a part that saw no key). Returns (o float32 [B, S, H, D], lse)."""
    lse = lse.float()
    m = lse.amax(0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m)                                   # [P, B, H, S]; a -inf part weighs 0
    s = w.sum(0)
    num = (o.float() * w.transpose(-1, -2)[..., None]).sum(0)
    o_out = num / torch.where(s == 0, torch.ones_like(s), s).transpose(-1, -2)[..., None]
    return o_out, torch.where(s == 0, torch.full_like(s, float("-inf")), m + torch.log(s))


def no_keys(B: int, Hq: int, D: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The partial result of a part without keys: out 0, lse -inf (weight 0 in a merge)."""
    return torch.zeros(B, 1, Hq, D, device=device), torch.full((B, Hq, 1), float("-inf"), device=device)


# -- attention on the CPU --------------------------------------------------------------------------------------
Fold = Tuple[int, int, Optional[torch.Tensor], List[Tuple[int, int, int, int]]]   # what fold_lengths returns


def cpu_range_attention(q: torch.Tensor, hk: torch.Tensor, hv: torch.Tensor, ranges: Sequence[Sequence[Range]],
                        threads: Optional[int] = None, folded: Optional[Fold] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q`` ``[B, 1, Hq, D]`` (host memory) to host ranges ``ranges[b]`` of layer tensors
    ``hk``, ``hv`` ``[blocks, B, Hkv, T, D]``, by the compiled CPU kernel (torch fallback): the block-aligned part
    in one call over blocks folded into its batch, the rest (a range starting inside a block) one call per piece,
    all merged by LSE; ``folded``: ``fold_lengths(ranges)`` when the caller has it (a decode step: once for every
    layer). Returns (o float32 [B, 1, Hq, D], lse [B, Hq, 1])."""
    B, _, Hq, D = q.shape
    T = hk.shape[3]
    j0, j1, lens, sliced = folded if folded is not None else fold_lengths(ranges, T)
    outs, lses = [], []
    if lens is not None:
        nb = j1 - j0
        k = hk[j0:j1].reshape(nb * B, hk.shape[2], T, D)
        v = hv[j0:j1].reshape(nb * B, hv.shape[2], T, D)
        o, lse = host_decode_attention(q.repeat(nb, 1, 1, 1), k, v, lens.reshape(-1), layout="bhtd", threads=threads)
        outs.append(o.view(nb, B, 1, Hq, D))
        lses.append(lse.view(nb, B, Hq, 1))
    for b, j, t0, t1 in sliced:
        o_b, lse_b = no_keys(B, Hq, D, "cpu")
        o_b[b:b + 1], lse_b[b:b + 1] = host_decode_attention(q[b:b + 1], hk[j, b:b + 1, :, t0:t1],
                                                             hv[j, b:b + 1, :, t0:t1], layout="bhtd", threads=threads)
        outs.append(o_b[None])
        lses.append(lse_b[None])
    if not outs:
        return no_keys(B, Hq, D, "cpu")
    return merge_stacked(torch.cat(outs), torch.cat(lses))
