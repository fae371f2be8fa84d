"""Joining the process group honours timeout_s and says what it waited for: a port in use, a missing
rank 0, missing peers, a missing node under torchrun, and --launcher env without a launcher."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from fastattn_dist.parallel import process_group as pg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SMALL = ["--seq", "67", "--hidden", "96", "--heads", "12", "--kv-heads", "6", "--repeats", "1", "--warmup", "0"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
                 "MV2_COMM_WORLD_RANK", "SLURM_PROCID", "SLURM_NTASKS")
# One rank joining; prints how long init_distributed took and what it raised.
JOIN = """
import json, sys, time
from fastattn_dist import init_distributed
rank, world, port, timeout = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
t0 = time.monotonic()
try:
    init_distributed("gloo", rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port, timeout_s=timeout)
    err = None
except Exception as e:
    err = f"{type(e).__name__}: {e}"
print(json.dumps({"s": time.monotonic() - t0, "error": err}))
"""


def free_ports(n):
    """``n`` distinct ports that were free a moment ago (held together while picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(("MASTER_", "OMPI_"))}
    return dict(env, PYTHON=sys.executable, PATH=BIN + os.pathsep + os.environ["PATH"], **extra)


@pytest.fixture(scope="module")
def runs():
    """Start every failing rendezvous at once (they mostly wait), then collect them: {name: result}."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()  # accepts connections, answers nothing: a port some other program uses
        busy = held.getsockname()[1]
        nobody, nobody2, node0_port, node1_port = free_ports(4)
        cases = {
            "rank0_port_in_use": ([sys.executable, "-c", JOIN, "0", "2", str(busy), "5"], {}),
            "rank1_port_in_use": ([sys.executable, "-c", JOIN, "1", "2", str(busy), "3"], {}),
            "lone_rank1": ([sys.executable, "-c", JOIN, "1", "2", str(nobody), "5"], {}),
            "lone_rank0": ([sys.executable, "-c", JOIN, "0", "3", str(nobody2), "3"], {}),
        }
        if shutil.which("torchrun", path=BIN + os.pathsep + os.environ["PATH"]):
            # node 1 of 2 whose node 0 never comes; node 0 of 2 whose node 1 never comes (each its own port)
            # 2 nodes x 2 ranks: a shape the 4 ranks can split (the launch script checks it before waiting)
            world4 = [("4" if a == "6" and SMALL[i - 1] == "--kv-heads" else a) for i, a in enumerate(SMALL)]
            torchrun = ["bash", "launch/torchrun.sh", "demo", "--timeout-s", "3", *world4]
            cases["torchrun_node1"] = (torchrun, dict(NNODES="2", NODE_RANK="1", MASTER_ADDR="127.0.0.2",
                                                      MASTER_PORT=str(node1_port)))
            cases["torchrun_node0"] = (torchrun, dict(NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1",
                                                      MASTER_PORT=str(node0_port)))
        procs = {name: (subprocess.Popen(cmd, cwd=ROOT, env=clean_env(**extra), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True), time.monotonic())
                 for name, (cmd, extra) in cases.items()}
        out = {"busy": busy, "nobody": nobody, "node0_port": node0_port, "node1_port": node1_port}
        for name, (p, t0) in procs.items():
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, t0 + 60 - time.monotonic()))
            except subprocess.TimeoutExpired:  # never leave one waiting
                p.kill()
                stdout, stderr = p.communicate()
                stderr += "\n<killed: still waiting after 60 s>"
            out[name] = dict(rc=p.returncode, wall=time.monotonic() - t0, stdout=stdout, stderr=stderr)
    return out


def joined(runs, name):
    r = runs[name]
    lines = [l for l in r["stdout"].splitlines() if l.startswith("{")]
    assert lines, r["stderr"][-3000:]
    return json.loads(lines[-1])


def test_rank0_names_the_port_in_use(runs):
    res = joined(runs, "rank0_port_in_use")
    assert res["error"] and res["s"] < 10, res  # at once, not after a timeout (slack for a busy machine)
    assert "RendezvousError" in res["error"] and "rank 0 of 2" in res["error"], res
    assert f"port {runs['busy']}" in res["error"] and "already in use" in res["error"], res


def test_rank1_at_a_port_that_is_no_store_fails_in_time(runs):
    res = joined(runs, "rank1_port_in_use")  # torch's TCPStore client alone would wait forever
    assert res["error"] and res["s"] < 3 + 10, res
    assert "rank 1 of 2" in res["error"] and f"127.0.0.1:{runs['busy']}" in res["error"], res


def test_lone_rank1_fails_in_time_naming_rank0s_address(runs):
    res = joined(runs, "lone_rank1")
    assert res["error"] and res["s"] < 5 + 10, res
    for part in ("rank 1 of 2", "rank 0", f"127.0.0.1:{runs['nobody']}", "within 5 s"):
        assert part in res["error"], (part, res)


def test_missing_peers_are_named(runs):
    res = joined(runs, "lone_rank0")
    assert res["error"] and res["s"] < 3 + 10, res
    assert "ranks 1..2 did not join within 3 s" in res["error"], res


@pytest.mark.parametrize("node", [1, 0])
def test_torchrun_node_without_its_peer_fails_in_time(runs, node):
    if f"torchrun_node{node}" not in runs:
        pytest.skip("no torchrun")
    r = runs[f"torchrun_node{node}"]
    assert r["rc"] != 0 and r["wall"] < 3 + 45, (r["wall"], r["stderr"][-3000:])  # not torchrun's 600 s default
    addr = "127.0.0.2" if node else "127.0.0.1"
    said = r["stderr"].splitlines()[0]  # said before waiting
    assert f"node {node} of 2" in said and f"{addr}:{runs[f'node{node}_port']}" in said and "3 s" in said, said
    if node:
        assert "could not reach node 0's rendezvous" in r["stderr"], r["stderr"][-3000:]


@pytest.mark.skipif(shutil.which("mpirun", path=BIN + os.pathsep + os.environ["PATH"]) is None,
                    reason="no mpirun: install the 'mpi' extra (CI does)")
def test_mpirun_with_master_port_in_use_fails_in_time():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run(["bash", "launch/mpirun.sh", "demo", "--timeout-s", "3", *SMALL], cwd=ROOT,
                           env=clean_env(MASTER_PORT=str(port), MASTER_ADDR="127.0.0.1"), capture_output=True,
                           text=True, timeout=90)
    assert r.returncode != 0 and time.monotonic() - t0 < 3 + 45, r.stderr[-3000:]
    assert f"rank 0 of 2: could not listen on rendezvous port {port}" in r.stderr, r.stderr[-3000:]


def test_launcher_env_without_a_launcher_is_an_error(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"--launcher env needs torchrun, mpirun or Slurm variables .*none found"):
        pg.require_launcher()
    try:
        with pytest.raises(ValueError, match="--launcher env needs"):
            pg.init_distributed("gloo", launcher="env")
    finally:
        pg.shutdown()  # had it joined a world of 1, leave this test process as it was
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    assert pg.require_launcher() == "mpi"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert pg.require_launcher() == "torchrun"
