"""The launchers users reach for: torchrun and mpirun run the demo and agree with the local spawn."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--seq", "67", "--hidden", "96", "--heads", "12", "--kv-heads", "6", "--tiles", "3", "--repeats", "1",
         "--warmup", "0", "--json"]


def run(cmd, env_extra=None):
    env = dict(os.environ, PYTHON=sys.executable, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               **(env_extra or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, r.stdout  # rank 0 alone prints
    return json.loads(lines[0])


def check(summary, world):
    assert summary["world_size"] == world and summary["num_tiles"] == 3
    assert summary["max_rel_err"] < 1e-5 and summary["tiled_vs_sequential_max_abs"] < 1e-5


def test_torchrun():
    check(run(["bash", "launch/torchrun.sh", "demo", *SMALL], {"NPROC": "2"}), 2)


@pytest.mark.skipif(shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
                    is None, reason="no mpirun: install the 'mpi' extra (CI does)")
def test_mpirun():
    check(run(["bash", "launch/mpirun.sh", "demo", *SMALL], {"NP": "3"}), 3)
