"""Ranks die with their parent (kill -9 included) and stop quietly, and fast, on Ctrl-C."""
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ["demo", "--repeats", "100000", "--seq", "512", "--world-size", "2"]
# The CLI with Ctrl-C mapped as cli.main is to map it: one line on stderr, exit code 130.
CLI_WITH_CTRL_C = """
import sys
from fastattn_dist.cli import main
try:
    sys.exit(main(sys.argv[1:]))
except KeyboardInterrupt:
    print("fastattn-dist: interrupted", file=sys.stderr)
    sys.exit(130)
"""


def children(pid):
    kids = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.update(int(k) for k in f.read().split())
    except OSError:
        pass
    return kids


def is_rank(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return "spawn_main" in f.read()  # not multiprocessing's resource tracker
    except OSError:
        return False


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def wait_gone(pids, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(alive(k) for k in pids):
        time.sleep(0.1)
    return [k for k in pids if alive(k)]


# Starts the run with Ctrl-C at its default, as a terminal's shell starts a foreground job: a background job of a
# non-interactive shell (``cmd &`` in a script, as some CI runners start the suite) inherits SIGINT ignored, and
# Python then leaves it ignored, so the run would rightly not stop and the test would test nothing. A wrapper
# that resets it and execs the run (same pid), since preexec_fn is unsafe in a parent with threads.
AS_A_TERMINALS_JOB = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                      "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


@pytest.fixture
def run_in_session():
    """Start a run as a shell job (its own session and process group) once its two ranks exist,
    ``settle_s`` later; kill the whole group afterwards, whatever happened."""
    started = []

    def start(argv, settle_s, **env):
        p = subprocess.Popen([sys.executable, "-c", AS_A_TERMINALS_JOB, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1", **env))
        started.append(p)
        end = time.monotonic() + 60
        while time.monotonic() < end and p.poll() is None:
            ranks = {k for k in children(p.pid) if is_rank(k)}
            if len(ranks) == 2:
                time.sleep(settle_s)
                return p, ranks
            time.sleep(0.05)
        pytest.fail("the two ranks did not start")

    yield start
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # orphaned ranks keep the group: none survives the test
        except ProcessLookupError:
            pass
        p.communicate()


@pytest.mark.parametrize("pdeathsig", [True, False], ids=["prctl", "heartbeat-fallback"])
def test_ranks_die_with_parent_on_kill_9(run_in_session, pdeathsig):
    env = {} if pdeathsig else {"FASTATTN_DIST_NO_PDEATHSIG": "1"}
    p, ranks = run_in_session(["-m", "fastattn_dist", *DEMO], settle_s=2.0, **env)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)  # not communicate(): orphaned ranks would hold its pipes open
    assert wait_gone(ranks, 10) == [], "ranks outlived their killed parent"


@pytest.mark.parametrize("to_group,settle_s", [(True, 0.0), (True, 2.0), (False, 2.0)],
                         ids=["ctrl-c-at-start-up", "ctrl-c-at-work", "sigint-to-parent"])
def test_ctrl_c_stops_all_ranks_quietly(run_in_session, to_group, settle_s):
    p, ranks = run_in_session(["-c", CLI_WITH_CTRL_C, *DEMO], settle_s)
    t0 = time.monotonic()
    if to_group:
        os.killpg(p.pid, signal.SIGINT)  # what a terminal does
    else:
        os.kill(p.pid, signal.SIGINT)
    try:
        _, err = p.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("no exit within 15 s of SIGINT")
    assert time.monotonic() - t0 < 14
    assert wait_gone(ranks, 5) == []
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == "fastattn-dist: interrupted"
