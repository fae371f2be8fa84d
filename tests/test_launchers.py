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


MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


@pytest.mark.parametrize("script,env,args,message", [
    ("torchrun.sh", {"NPROC": "3"}, ["demo"], "divisible by the world size (3)"),
    ("torchrun.sh", {"NPROC": "0"}, ["demo"], "NPROC must be an int >= 1"),
    ("torchrun.sh", {"NPROC": "2", "NNODES": "x"}, ["demo"], "NNODES must be an int >= 1"),
    ("torchrun.sh", {"NPROC": "2"}, ["demo", "--mask", "foo"], "unknown mask"),
    ("torchrun.sh", {"NPROC": "2"}, ["bench", "--quick", "--out", "{file}/x"], "not a writable directory"),
    ("mpirun.sh", {"NP": "3"}, ["demo"], "divisible by the world size (3)"),
    ("mpirun.sh", {"NP": "-1"}, ["demo"], "NP must be an int >= 1"),
    ("mpirun.sh", {"NP": "2"}, ["demo", "--mask", "foo"], "unknown mask"),
], ids=["torchrun-world", "torchrun-nproc0", "torchrun-nnodes", "torchrun-mask", "torchrun-out", "mpirun-world",
        "mpirun-np", "mpirun-mask"])
def test_bad_values_under_a_launcher_are_one_line_before_any_rank(tmp_path, script, env, args, message):
    """The launch scripts check the command as its ranks would before starting any: one line, exit code 2, and
    neither the launcher's own report nor one error per rank."""
    if script == "mpirun.sh" and MPIRUN is None:
        pytest.skip("no mpirun: install the 'mpi' extra (CI does)")
    (tmp_path / "afile").write_text("")
    args = [a.replace("{file}", str(tmp_path / "afile")) for a in args]
    full_env = dict(os.environ, PYTHON=sys.executable, **env,
                    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", f"launch/{script}", *args], capture_output=True, text=True, timeout=180, cwd=ROOT,
                       env=full_env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and message in lines[0] and "error" in lines[0], r.stderr[-3000:]
    assert r.stdout == ""


def test_help_and_version_through_a_launcher_run_once():
    env = dict(os.environ, PYTHON=sys.executable, NPROC="2",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", "launch/torchrun.sh", "--version"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env=env)
    assert r.returncode == 0 and r.stdout.strip().startswith("fastattn-dist "), r.stderr
    assert len(r.stdout.strip().splitlines()) == 1
