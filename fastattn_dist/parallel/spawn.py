"""Spawn N local ranks (one process each, gloo on CPU or NCCL on local GPUs) and collect their results.

Used by the CLI (so ``fastattn-dist demo`` needs no launcher) and by the multi-rank tests. It never
hangs: every rank runs under the process group's collective timeout, and the parent enforces an
overall deadline. The first rank to fail is named in the error, together with what the others said.
"""
from __future__ import annotations

import io
import os
import queue as queue_mod
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch.multiprocessing as mp

from .process_group import DEFAULT_TIMEOUT_S, free_port, init_distributed, shutdown


class RankFailedError(RuntimeError):
    """One or more spawned ranks raised, died, or timed out. ``.rank`` is the first to fail."""

    def __init__(self, message: str, rank: Optional[int], errors: dict):
        super().__init__(message)
        self.rank = rank
        self.errors = errors


# A rank whose peer died fails in its next collective with one of these: a consequence, not a cause.
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "Timed out", "timed out", "NCCL communicator was aborted")


def _root_cause(errors: dict, order: list) -> int:
    """The rank to blame: one that raised its own error, else one that died silently, else the first."""
    def rank_of(r):
        summary = errors[r][0]
        if any(m in summary for m in _SECONDARY):
            return 2
        return 1 if ("without reporting" in summary or "still running" in summary) else 0
    return min(dict.fromkeys(order), key=lambda r: (rank_of(r), order.index(r)))


def _pack(obj) -> bytes:
    # Plain bytes, not torch's shared-memory handles: those die with the rank that made them.
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world_size: int, port: int, backend: str, timeout_s: float, threads: Optional[int],
            fn: Callable, args: Sequence[Any], results) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    try:
        init_distributed(backend, rank=rank, world_size=world_size, master_port=port, timeout_s=timeout_s,
                         launcher="spawn")
        out = fn(rank, world_size, *args)
        results.put(("ok", rank, _pack(out)))
    except BaseException as e:  # report everything, including KeyboardInterrupt/SystemExit, then die
        summary = f"{type(e).__name__}: {e}"
        results.put(("error", rank, (summary, traceback.format_exc())))
        results.close()
        results.join_thread()  # flush the message before the hard exit below
        shutdown()
        os._exit(1)
    shutdown()


def spawn_ranks(fn: Callable, world_size: int, args: Sequence[Any] = (), *, backend: str = "gloo",
                timeout_s: float = DEFAULT_TIMEOUT_S, deadline_s: Optional[float] = None,
                threads_per_rank: Optional[int] = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; return their results by rank.

    ``fn`` must be importable (module level). ``timeout_s`` bounds each collective; ``deadline_s``
    (default ``2 * timeout_s + 60``) bounds the whole run. Raises ``RankFailedError`` naming the
    first rank that raised or died.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    deadline_s = deadline_s if deadline_s is not None else 2 * timeout_s + 60
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout_s, threads_per_rank,
                                                fn, tuple(args), results), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outputs: dict = {}
    errors: dict = {}
    first_failed: Optional[int] = None
    seen_dead: dict = {}  # rank -> when we first saw its process gone without a message
    end = time.monotonic() + deadline_s
    grace_end = None

    def fail(rank: int, payload) -> None:
        nonlocal first_failed, grace_end
        errors[rank] = payload
        if first_failed is None:
            first_failed = rank
            # Collect the others' errors for a moment (they fail when their peer goes away).
            grace_end = time.monotonic() + 3.0

    try:
        while len(outputs) + len(errors) < world_size:
            now = time.monotonic()
            if (grace_end is not None and now > grace_end) or now > end:
                break
            try:
                kind, rank, payload = results.get(timeout=0.2)
                (outputs.__setitem__(rank, _unpack(payload)) if kind == "ok" else fail(rank, payload))
                continue
            except queue_mod.Empty:
                pass
            for r, p in enumerate(procs):
                if r in outputs or r in errors or p.exitcode is None:
                    continue
                t0 = seen_dead.setdefault(r, now)
                if now - t0 > 2.0:  # its message, if any, would have arrived by now
                    fail(r, (f"process exited with code {p.exitcode} without reporting a result", ""))
        missing = [r for r in range(world_size) if r not in outputs and r not in errors]
        if missing and first_failed is None:
            for r in missing:
                fail(r, (f"no result within the {deadline_s:.0f} s deadline (hung or stuck?)", ""))
        else:
            for r in missing:
                errors[r] = ("still running when the run was aborted", "")
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors else 10)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        first_failed = _root_cause(errors, order=[first_failed] + sorted(errors))
        summary, tb = errors[first_failed]
        others = "; ".join(f"rank {r}: {errors[r][0]}" for r in sorted(errors) if r != first_failed)
        msg = f"rank {first_failed} of {world_size} failed: {summary}"
        if others:
            msg += f"\n  then: {others}"
        if tb:
            msg += f"\n--- traceback of rank {first_failed} ---\n{tb}"
        raise RankFailedError(msg, first_failed, errors)
    return [outputs[r] for r in range(world_size)]
