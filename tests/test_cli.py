"""The CLI as users run it: the demo (table and --json), and its errors."""
import json
import os
import subprocess
import sys

import pytest

SMALL = ["--seq", "96", "--hidden", "128", "--heads", "8", "--kv-heads", "4", "--repeats", "2", "--warmup", "0"]


def run_cli(*args, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "fastattn_dist", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_demo_default_prints_table():
    r = run_cli("demo")
    assert r.returncode == 0, r.stderr
    assert "sequential" in r.stdout and "tiled" in r.stdout and "speedup" in r.stdout
    assert "[demo] timing tiled" in r.stderr  # progress goes to stderr


@pytest.mark.parametrize("extra", [[], ["--world-size", "3", "--heads", "6", "--kv-heads", "3", "--hidden", "96",
                                        "--tiles", "3", "--mask", "sliding_window:17", "--no-link"]])
def test_demo_json(extra):
    r = run_cli("demo", *SMALL, "--json", *extra)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("max_rel_err", "sequential_ms", "tiled_ms", "speedup", "num_tiles", "plan", "world_size"):
        assert key in s
    assert s["max_rel_err"] < 1e-5 and s["tiled_vs_sequential_max_abs"] < 1e-5
    assert s["sequential_ms"] > 0 and s["tiled_ms"] > 0
    if extra:
        assert s["world_size"] == 3 and s["num_tiles"] == 3
        # more simulated devices than cores: said once, on stderr, exactly when it is true
        assert ("3 CPU ranks on" in r.stderr) == ((os.cpu_count() or 1) < 3)


@pytest.mark.parametrize("args,message", [
    (["--tiles", "0"], "tiles must be an int >= 1"),
    (["--tiles", "many"], "tiles must be an int"),
    (["--world-size", "4", "--heads", "6", "--kv-heads", "2", "--hidden", "96"], "divisible by the world size"),
    (["--mask", "diagonal"], "unknown mask"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--link-gbps", "0"], "bandwidth must be > 0"),
])
def test_demo_bad_arguments(args, message):
    r = run_cli("demo", *SMALL, *args, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_quick_runs_every_variant_on_cpu(tmp_path):
    """The GPU benchmark's code path (baseline, parts, tiles 1/auto/fixed, graph mode) on gloo ranks."""
    r = run_cli("bench", "--quick", "--dtype", "float32", "--repeats", "1", "--warmup", "0", "--tile-counts", "3",
                "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "bench_tp2.json").read_text())
    assert len(data["results"]) == 2
    for res in data["results"]:
        assert set(res["runs"]) == {"compute_t1", "compute_t3", "nccl_t1", "nccl_t3", "nccl_tauto", "auto_tauto"}
        assert all("error" not in v for v in res["runs"].values()), res["runs"]
        assert res["max_err_vs_t1"] < 1e-5 and res["max_err_vs_baseline"] < 1e-5
        assert res["runs"]["nccl_t3"]["tiles"] == 3 and res["runs"]["compute_t3"]["tile_tax"] > 0
    assert "| 2 | 256/8 | 2 | 301 |" in (tmp_path / "bench_tp2.md").read_text()
