"""Functions that spawned ranks run in the multi-rank tests (module level, so spawn can import them)."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import fastattn_dist as fa
from fastattn_dist.parallel.link_models import LinkModel
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
                             rope_theta=c.get("rope"), link=c.get("link"), attn_precision=c.get("attn_precision", "bf16"))
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


def disagreeing_inputs(rank, world, odd_rank):
    """Blocks with check_inputs=True, where rank ``odd_rank`` differs from the others in one way per case.

    Returns {case: the ValueError's message, or None if the call passed} and {case: all_gather_object calls}.
    """
    real_gather = dist.all_gather_object
    calls = {}

    def block():
        blk = fa.TPAttention(48, 6, 6, tiles=2, check_inputs=True)
        blk.load_full_weights(*make_weights(48, 6, 6))
        return blk

    odd = rank == odd_rank
    cases = {
        "seq": lambda b: b(make_input(1, 9 if odd else 8, 48)),
        "mask": lambda b: b(make_input(1, 8, 48), mask="none" if odd else "causal"),
        "window": lambda b: b(make_input(1, 8, 48), mask=fa.SlidingWindow(5 if odd else 4)),
        "key_lengths": lambda b: b(make_input(2, 8, 48), mask=fa.KeyPadding([8, 3] if odd else [3, 8])),
        "input": lambda b: b(make_input(1, 8, 48, seed=2 if odd else 1)),
        "rows_swapped": lambda b: b(make_input(1, 8, 48).flip(1) if odd else make_input(1, 8, 48)),
        # equal inputs: one check per shape, however often it is called
        "equal": lambda b: [b(make_input(1, 8, 48)) for _ in range(3)] + [b(make_input(2, 5, 48))],
        # attend() takes each rank's own heads: only shapes and masks must agree
        "attend": lambda b: b.attend(*b.project_qkv(make_input(1, 8, 48))),
    }
    out = {}
    for name, run in cases.items():
        n = [0]

        def counting(*a, **kw):
            n[0] += 1
            return real_gather(*a, **kw)
        dist.all_gather_object = counting
        try:
            run(block())
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
        finally:
            dist.all_gather_object = real_gather
        calls[name] = n[0]
    return out, calls
