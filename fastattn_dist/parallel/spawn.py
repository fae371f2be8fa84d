"""Spawn N local ranks (one process each, gloo on CPU or NCCL on local GPUs) and collect their results.

Used by the CLI (so ``fastattn-dist demo`` needs no launcher) and by the multi-rank tests. It never
hangs, and never kills a healthy run for taking long: a stuck collective fails under the process
group's collective timeout, and a rank whose process stops making progress at all (stopped, or an
interpreter that no longer runs Python) is caught by its heartbeat. The first rank to fail is named
in the error, together with what the others said. Ranks die with the parent (even on ``kill -9``),
ignore Ctrl-C (the parent stops them, so there is one KeyboardInterrupt, not one traceback per rank).
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import multiprocessing
import os
import queue as queue_mod
import signal
import sys
import threading
import time
import traceback
from multiprocessing import resource_tracker
from typing import Any, Callable, Optional, Sequence

import torch
import torch.multiprocessing as mp

from .process_group import DEFAULT_TIMEOUT_S, free_port, init_distributed, shutdown

_HEARTBEAT_S = 0.5
# Before its first heartbeat a rank is still importing torch, which can take a minute on a busy node.
_STARTUP_S = 120.0
# How long to collect the other ranks' errors after the first failure (they fail when a peer goes away).
_GRACE_S = 3.0


class RankFailedError(RuntimeError):
    """One or more spawned ranks raised, died, or got stuck. ``.rank`` is the first to fail."""

    def __init__(self, message: str, rank: Optional[int], errors: dict):
        super().__init__(message)
        self.rank = rank
        self.errors = errors


# A rank whose peer died, hung or never came fails with one of these: a consequence, not a cause.
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "Timed out", "timed out", "NCCL communicator was aborted",
              "did not join within", "could not reach rank 0", "lost rank 0's store")
_STILL_RUNNING = "still running when the run was aborted"
_DIED = "without reporting a result"


def _is_secondary(summary: str) -> bool:
    return any(m in summary for m in _SECONDARY) or _STILL_RUNNING in summary


def _root_cause(errors: dict, order: list) -> int:
    """The rank to blame: one that raised its own error (or got stuck), else one that died silently
    or never got as far as its peers (still running), else the first."""
    def rank_of(r):
        summary = errors[r][0]
        if any(m in summary for m in _SECONDARY):
            return 2
        return 1 if (_DIED in summary or _STILL_RUNNING in summary) else 0
    return min(dict.fromkeys(order), key=lambda r: (rank_of(r), order.index(r)))


def _pack(obj) -> bytes:
    # Plain bytes, not torch's shared-memory handles: those die with the rank that made them.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


# ---------------------------------------------------------------- in the rank

def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this rank when the parent dies, however it dies (Linux)."""
    # FASTATTN_DIST_NO_PDEATHSIG=1 leaves it to the heartbeat thread's check (to test that fallback).
    if sys.platform.startswith("linux") and not os.environ.get("FASTATTN_DIST_NO_PDEATHSIG"):
        try:
            # PR_SET_PDEATHSIG (1). It fires when the parent *thread* exits: spawn_ranks starts the
            # ranks from the thread that then waits for them, so that thread outlives them.
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the heartbeat thread's check still applies
    if os.getppid() != parent_pid:  # the parent died before prctl: no signal will come
        os._exit(1)


def _start_heartbeat(rank: int, beats, parent_pid: int) -> None:
    """A daemon thread that ticks this rank's heartbeat, and exits the rank once the parent is gone
    (the portable fallback for prctl: the parent's sentinel pipe closes when it dies)."""
    parent = multiprocessing.parent_process()

    def run():
        while True:
            beats[rank] += 1
            if os.getppid() != parent_pid or (parent is not None and not parent.is_alive()):
                os._exit(1)
            time.sleep(_HEARTBEAT_S)

    threading.Thread(target=run, name="fastattn-heartbeat", daemon=True).start()


def _worker(rank: int, world_size: int, port: int, backend: str, timeout_s: float, threads: Optional[int],
            fn: Callable, args: Sequence[Any], conn, beats, parent_pid: int) -> None:
    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent around start
    _die_with_parent(parent_pid)
    _start_heartbeat(rank, beats, parent_pid)
    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)  # all spawned ranks share this node (as torchrun says)
    try:
        init_distributed(backend, rank=rank, world_size=world_size, master_port=port, timeout_s=timeout_s,
                         launcher="spawn")
        out = fn(rank, world_size, *args)
        conn.send(("ok", _pack(out)))
    except BaseException as e:  # report everything, including SystemExit, then die
        try:
            conn.send(("error", (f"{type(e).__name__}: {e}", traceback.format_exc())))
            conn.close()
        except OSError:  # the parent is gone: nobody to tell
            pass
        shutdown()
        os._exit(1)
    conn.close()
    shutdown()


# ---------------------------------------------------------------- in the parent

@contextlib.contextmanager
def _sigint_blocked():
    """Block SIGINT in this thread while starting ranks: they inherit the mask (then ignore SIGINT),
    so a Ctrl-C during their start-up cannot print a traceback from their imports. Not lost here:
    a blocked signal stays pending until the mask is restored."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "closed its result pipe"
    if code < 0:
        try:
            return f"process killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"process killed by signal {-code}"
    return f"process exited with code {code}"


def _reap(procs: list, wait_s: float, stuck: set) -> None:
    """Let finished ranks exit for ``wait_s``, then terminate, then kill whatever is left."""
    started = [(r, p) for r, p in enumerate(procs) if p.pid is not None]
    for r, p in started:
        if r in stuck:  # stopped or wedged: SIGTERM would wait in vain
            p.kill()
    end = time.monotonic() + wait_s
    for _, p in started:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for _, p in started:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + 2.0
    for _, p in started:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for _, p in started:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


class _Supervisor:
    """The parent's view of the ranks while they run: their results and errors as they arrive, their heartbeats,
    the first failure and the grace period after it (module docstring)."""

    def __init__(self, procs: list, beats, stall_s: float, deadline_s: Optional[float]) -> None:
        self.procs, self.beats, self.stall_s, self.deadline_s = procs, beats, stall_s, deadline_s
        self.inbox: queue_mod.Queue = queue_mod.Queue()
        self.outputs: dict = {}
        self.errors: dict = {}
        self.stuck: set = set()
        self.first_failed: Optional[int] = None
        self.grace_end: Optional[float] = None

    def fail(self, rank: int, payload) -> None:
        self.errors[rank] = payload
        if self.first_failed is None:
            self.first_failed = rank
            self.grace_end = time.monotonic() + _GRACE_S

    def read(self, rank: int, conn) -> None:
        """On a thread of its own: the rank's one message (its result or its error), or EOF if it died."""
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            msg = None  # the rank exited (or was killed) without a word
        except Exception as e:  # an unreadable result
            msg = ("error", (f"unreadable result: {type(e).__name__}: {e}", ""))
        finally:
            conn.close()
        self.inbox.put((rank, msg))

    def _receive(self) -> bool:
        """Take one message if one comes within 0.2 s; whether one did."""
        try:
            rank, msg = self.inbox.get(timeout=0.2)
        except queue_mod.Empty:
            return False
        if rank in self.errors:  # already judged (stuck): keep that verdict
            return True
        if msg is None:
            self.procs[rank].join(timeout=1.0)
            self.fail(rank, (f"{_describe_exit(self.procs[rank].exitcode)} {_DIED}", ""))
        elif msg[0] == "ok":
            self.outputs[rank] = _unpack(msg[1])
        else:
            self.fail(rank, msg[1])
        return True

    def _check_heartbeats(self, last_beat: list, last_change: list) -> None:
        now = time.monotonic()
        for r in range(len(self.procs)):
            if r in self.outputs or r in self.errors:
                continue
            beat = self.beats[r]
            if beat != last_beat[r]:
                last_beat[r], last_change[r] = beat, now
                continue
            silent = now - last_change[r]
            if silent > (self.stall_s if beat else max(self.stall_s, _STARTUP_S)) and self.procs[r].is_alive():
                self.stuck.add(r)
                self.fail(r, (f"stuck: its process is alive but sent no heartbeat for {silent:.0f} s "
                              "(stopped, or its interpreter no longer runs?)", ""))

    def watch(self) -> None:
        """Until every rank reported, or the grace after a failure or the caller's deadline ran out."""
        n = len(self.procs)
        start = last_loop = time.monotonic()
        end = None if self.deadline_s is None else start + self.deadline_s
        last_beat, last_change = [0] * n, [start] * n
        while len(self.outputs) + len(self.errors) < n:
            now = time.monotonic()
            if (self.grace_end is not None and now > self.grace_end) or (end is not None and now > end):
                break
            if now - last_loop > 2.0:
                # We did not run for a while (Ctrl-Z, a suspended machine): neither did the ranks,
                # most likely; do not count that time against their heartbeats.
                last_change = [t + (now - last_loop) for t in last_change]
            last_loop = now
            if not self._receive():
                self._check_heartbeats(last_beat, last_change)
        missing = [r for r in range(n) if r not in self.outputs and r not in self.errors]
        if missing and self.first_failed is None:  # only the caller's deadline ends a run nobody failed
            for r in missing:
                self.fail(r, (f"no result within the run's deadline_s={self.deadline_s:g} s", ""))
        else:
            for r in missing:
                self.errors[r] = (_STILL_RUNNING, "")

    def error(self) -> RankFailedError:
        errors = self.errors
        first = _root_cause(errors, order=[self.first_failed] + sorted(errors))
        summary, tb = errors[first]
        # the others' own errors; a peer's raw transport error after the first failure ("Connection reset by
        # peer", a timeout) is its consequence, not news: the error names the rank that failed and nothing else
        # (unless that rank was merely still running: then the others' timeouts say why it was blamed)
        others = "; ".join(f"rank {r}: {errors[r][0]}" for r in sorted(errors)
                           if r != first and (_STILL_RUNNING in summary or not _is_secondary(errors[r][0])))
        msg = f"rank {first} of {len(self.procs)} failed: {summary}"
        if others:
            msg += f"\n  then: {others}"
        if tb:
            msg += f"\n--- traceback of rank {first} ---\n{tb}"
        return RankFailedError(msg, first, errors)


def spawn_ranks(fn: Callable, world_size: int, args: Sequence[Any] = (), *, backend: str = "gloo",
                timeout_s: float = DEFAULT_TIMEOUT_S, deadline_s: Optional[float] = None,
                stall_s: Optional[float] = None, threads_per_rank: Optional[int] = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; return their results by rank.

    ``fn`` must be importable (module level). ``timeout_s`` bounds the rendezvous and each
    collective. A rank whose process is alive but sends no heartbeat for ``stall_s`` seconds
    (default ``timeout_s + 30``) is reported as stuck; a rank that is alive and heartbeating is
    never failed for taking long, unless the caller sets ``deadline_s``, a bound on the whole run
    (default: none). Raises ``RankFailedError`` naming the first rank that raised, died or got
    stuck. On KeyboardInterrupt the ranks are killed and the KeyboardInterrupt is re-raised.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    stall_s = timeout_s + 30.0 if stall_s is None else stall_s
    if stall_s <= 0 or (deadline_s is not None and deadline_s <= 0):
        raise ValueError(f"stall_s and deadline_s must be > 0, got {stall_s} and {deadline_s}")
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    beats = ctx.RawArray("Q", world_size)  # each rank ticks its own slot
    port = free_port()
    procs, pipes = [], []
    for r in range(world_size):
        # One pipe per rank: EOF tells the parent the rank is gone, and a rank dying mid-message
        # cannot block the others' results (as it could on a shared queue).
        recv, send = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout_s, threads_per_rank,
                                                       fn, tuple(args), send, beats, os.getpid()), daemon=False))
        pipes.append((recv, send))
    sup = _Supervisor(procs, beats, stall_s, deadline_s)
    wait_s = 0.5  # how long ranks may take to exit by themselves before they are terminated
    try:
        if hasattr(signal, "pthread_sigmask"):
            # Start multiprocessing's resource tracker now: starting it (inside the first p.start())
            # unblocks SIGINT in this thread, undoing _sigint_blocked for the rank started with it.
            resource_tracker.ensure_running()
        for r, p in enumerate(procs):
            with _sigint_blocked():
                p.start()
            pipes[r][1].close()  # the rank holds the only write end now: its exit means EOF
            threading.Thread(target=sup.read, args=(r, pipes[r][0]), name=f"fastattn-rank{r}-result",
                             daemon=True).start()
        sup.watch()
        if not sup.errors:
            wait_s = 10.0  # all reported: they are tearing down their process groups
    except KeyboardInterrupt:
        wait_s = 0.0  # ranks ignore SIGINT: stop them now, then let the caller see the interrupt
        raise
    finally:
        _reap(procs, wait_s, sup.stuck)  # the readers then see EOF and end
    if sup.errors:
        raise sup.error()
    return [sup.outputs[r] for r in range(world_size)]
