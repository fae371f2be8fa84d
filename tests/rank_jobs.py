"""Functions that spawned ranks run in the multi-rank tests (module level, so spawn can import them)."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import fastattn_dist as fa
from fastattn_dist.config import LinkModel
from fastattn_dist.parallel.comm import ProcessGroupAllReduce


def make_weights(hidden, heads, kv_heads, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    D = hidden // heads
    s = hidden ** -0.5
    ws = [torch.randn(heads * D, hidden, generator=g) * s, torch.randn(kv_heads * D, hidden, generator=g) * s,
          torch.randn(kv_heads * D, hidden, generator=g) * s, torch.randn(hidden, heads * D, generator=g) * s]
    return [w.to(dtype) for w in ws]


def make_input(batch, seq, hidden, seed=1, dtype=torch.float32):
    return torch.randn(batch, seq, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)


def block_grid(rank, world, cases):
    """Run every case ``(name, cfg)``; return {name: {tiles: (output, plan bounds)}}."""
    out = {}
    for name, c in cases:
        dtype = c.get("dtype", torch.float32)
        blk = fa.TPAttention(c["hidden"], c["heads"], c["kv_heads"], tiles="auto", dtype=dtype,
                             rope_theta=c.get("rope"), link=c.get("link"))
        blk.load_full_weights(*make_weights(c["hidden"], c["heads"], c["kv_heads"], dtype=dtype))
        x = make_input(c["batch"], c["seq"], c["hidden"], dtype=dtype)
        res = {}
        for tiles in c["tiles"]:
            y = blk(x, mask=c["mask"], tiles=tiles)
            res[tiles] = (y.clone(), blk.last_plan.bounds)
        out[name] = res
    return out


def raise_on(rank, world, bad_rank):
    if rank == bad_rank:
        raise RuntimeError(f"deliberate failure on rank {rank}")
    t = torch.ones(3)
    dist.all_reduce(t)
    return t.tolist()


def die_on(rank, world, bad_rank):
    if rank == bad_rank:
        os._exit(7)
    t = torch.ones(3)
    dist.all_reduce(t)
    return t.tolist()


def hang_on(rank, world, bad_rank, seconds):
    if rank == bad_rank:
        time.sleep(seconds)
    t = torch.ones(3)
    dist.all_reduce(t)
    return t.tolist()


def construct_block(rank, world, kwargs):
    """Construct a block with ``kwargs`` (bad ones raise before any collective) and run it once."""
    blk = fa.TPAttention(**kwargs)
    y = blk(torch.randn(1, 5, kwargs["hidden_size"]))
    return list(y.shape)


def forward_with(rank, world, x_shape, dtype, mask):
    blk = fa.TPAttention(16, 4, 2)
    x = torch.randn(*x_shape).to(dtype)
    return list(blk(x, mask=mask).shape)


def link_timing(rank, world, latency_us, gbps, nbytes, tiles):
    """Issue ``tiles`` all-reduces back to back through the simulated link; return the elapsed seconds."""
    comm = ProcessGroupAllReduce(None, LinkModel(latency_us, gbps))
    bufs = [torch.ones(nbytes // 4) for _ in range(tiles)]
    dist.barrier()
    t0 = time.perf_counter()
    hs = [comm.start(b, i) for i, b in enumerate(bufs)]
    comm.wait_all(hs)
    return time.perf_counter() - t0, [b[0].item() for b in bufs]


def steady(rank, world, steps, step_s):
    """Healthy but slow: ``steps`` compute steps of ``step_s`` seconds, an all-reduce after each."""
    x = torch.randn(64, 64)
    total = torch.zeros(1)
    for _ in range(steps):
        end = time.monotonic() + step_s
        while time.monotonic() < end:
            x = torch.tanh(x @ x)
        t = torch.ones(1)
        dist.all_reduce(t)
        total += t
    return total.item()


def pid_then_sleep(rank, world, pid_dir, seconds):
    """Write this rank's pid to ``pid_dir/rank<r>`` (for a test to signal it), then sleep."""
    tmp = os.path.join(pid_dir, f".rank{rank}")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(pid_dir, f"rank{rank}"))
    time.sleep(seconds)
    return rank
