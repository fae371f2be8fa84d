"""Hang detection follows progress, not run time: slow healthy ranks pass, a stopped rank is named."""
import os
import signal
import threading
import time

import pytest

from fastattn_dist import RankFailedError, spawn_ranks
from rank_jobs import pid_then_sleep, steady


def test_slow_healthy_run_outlasts_timeout_and_stall_limit():
    # Each step computes for 3.5 s between all-reduces: longer than the collective timeout and the
    # stall limit, and the whole run longer than both together. Alive and heartbeating: not hung.
    t0 = time.monotonic()
    out = spawn_ranks(steady, 2, (2, 3.5), timeout_s=2, stall_s=3)
    assert out == [4.0, 4.0]
    assert time.monotonic() - t0 > 2 + 3


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_stopped_rank_is_named_as_stuck(tmp_path):
    def stop_rank1():
        path = tmp_path / "rank1"
        end = time.monotonic() + 60
        while not path.exists() and time.monotonic() < end:
            time.sleep(0.05)
        if path.exists():
            pid = int(path.read_text())
            stopped.append(pid)
            os.kill(pid, signal.SIGSTOP)

    stopped = []
    threading.Thread(target=stop_rank1, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(RankFailedError) as info:
            spawn_ranks(pid_then_sleep, 2, (str(tmp_path), 60), timeout_s=2, stall_s=3)
    finally:
        for pid in stopped:  # never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert stopped, "rank 1 never wrote its pid"
    assert info.value.rank == 1, str(info.value)
    assert "stuck" in info.value.errors[1][0] and "heartbeat" in info.value.errors[1][0]
    assert "still running" in info.value.errors[0][0]  # rank 0 was fine: aborted, not blamed
    assert time.monotonic() - t0 < 50  # the 3 s stall limit, not rank 1's 60 s sleep (slack for a busy machine)
