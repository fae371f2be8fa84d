"""The CLI as users run it: the demo (table and --json), and its errors."""
import json
import os

import pytest
import torch

from conftest import run_cli
from fastattn_dist import cli, runner
from fastattn_dist.cli.block_job import BlockConfig
from fastattn_dist.cli.options import launch_from_args

SMALL = ["--seq", "96", "--hidden", "128", "--heads", "8", "--kv-heads", "4", "--repeats", "2", "--warmup", "0"]


def main_in_process(argv, capsys):
    """``cli.main(argv)`` here: (exit code, stdout, stderr), argparse's exits included."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_demo_default_prints_table():
    r = run_cli("demo")
    assert r.returncode == 0, r.stderr
    assert "sequential" in r.stdout and "tiled" in r.stdout and "speedup" in r.stdout
    assert "[demo] timing tiled" in r.stderr  # progress goes to stderr
    assert "float64" in r.stderr and "--no-check skips it" in r.stderr  # the long check says what it is


def test_reference_reports_progress_over_every_query_row():
    from fastattn_dist.reference_block import reference_block
    from rank_jobs import make_input, make_weights

    done = []
    x = make_input(2, 601, 64)
    out = reference_block(x, *make_weights(64, 4, 2), 4, 2, rope_theta=1e4, chunk=256, progress=done.append)
    assert done == [256, 256, 89] and out.shape == (2, 601, 64)


def test_version():
    r = run_cli("--version", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"fastattn-dist {__import__('fastattn_dist').__version__}"


def test_every_option_says_what_it_does_and_its_default():
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in sub.choices.items():
        for a in parser._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            has_default = a.default not in (None, False, argparse.SUPPRESS) and not isinstance(a, argparse._StoreTrueAction)
            if not a.help or (has_default and "default" not in a.help):
                missing.append((name, a.option_strings))
    assert missing == []


def test_bench_without_quick_on_cpu_is_refused_in_one_line():
    r = run_cli("bench", "--repeats", "1", timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--quick" in r.stderr, r.stderr


@pytest.mark.parametrize("command", [["bench", "--quick"], ["profile", *SMALL], ["bench-model", "--model", "tiny"],
                                     ["bench-model", "--model", "tiny", "--profile"]],
                         ids=["bench", "profile", "bench-model", "bench-model-profile"])
def test_an_out_folder_under_a_file_is_one_line(tmp_path, command):
    (tmp_path / "afile").write_text("")
    flag = [] if command[-1] == "--profile" else ["--out"]
    r = run_cli(*command, *flag, str(tmp_path / "afile" / "x"), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "not a writable directory" in r.stderr, r.stderr[-2000:]


def test_tune_profile_path_is_checked(tmp_path):
    from fastattn_dist.tuning.measured import check_profile_writable

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="is a directory"):
        check_profile_writable(str(tmp_path))
    with pytest.raises(ValueError, match="not a writable directory"):
        check_profile_writable(str(tmp_path / "afile" / "tuned.json"))
    check_profile_writable(str(tmp_path / "new" / "tuned.json"))


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
    (["--tiles", "many"], "tiles must be an int >= 1 or 'auto'"),                      # argparse
    (["--world-size", "4", "--heads", "6", "--kv-heads", "2", "--hidden", "96"], "divisible by the world size"),
])
def test_demo_bad_arguments(args, message):
    """As a user's shell sees it (the in-process test below covers every value)."""
    r = run_cli("demo", *SMALL, *args, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
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
    md = (tmp_path / "bench_tp2.md").read_text()
    assert "| 2 | 256/8 | 2 | 301 |" in md
    # on CPU the process group is gloo, and a smoke run says its ratios measure nothing
    assert "comm: gloo" in md and "not a measurement" in md and "| gloo, " in md and "nccl" not in md.lower()
    assert all(row.split("|")[-3].strip() == "-" for row in md.splitlines() if row.startswith("| 2 |"))  # captured


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
BAD_VALUES = [
    (["--mask", "sliding_window:0"], "window must be >= 1, got 0"),
    (["--mask", "sliding_window:x"], "bad window in mask"),
    (["--attn-backend", "foo"], "unknown attention backend 'foo'"),
    (["--timeout-s", "0"], "argument --timeout-s: expected a finite number > 0"),
    pytest.param(["--dist-backend", "nccl"], "--dist-backend nccl needs CUDA GPUs", marks=NO_GPU),
    pytest.param(["--attn-backend", "cudnn"], "the cudnn attention backend needs a CUDA GPU", marks=NO_GPU),
    (["--tiles", "0"], "tiles must be an int >= 1 or 'auto'"),
    (["--tiles", "many"], "tiles must be an int >= 1 or 'auto'"),
    (["--mask", "diagonal"], "unknown mask 'diagonal'"),
    (["--world-size", "0"], "argument --world-size/-n: expected an int >= 1, got 0"),
    (["--world-size", "3"], "num_heads (8) must be divisible by the world size (3)"),
    (["--hidden", "40", "--heads", "8", "--kv-heads", "2"], "rotary embeddings need an even head_dim, got 5"),
    (["--kv-heads", "3"], "must be divisible by num_kv_heads"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--link-gbps", "0"], "link bandwidth must be > 0"),
    (["--launcher", "env"], "--launcher env needs torchrun, mpirun or Slurm"),
]


@pytest.mark.parametrize("command", ["demo", "profile"])
@pytest.mark.parametrize("args,message", BAD_VALUES)
def test_bad_values_fail_in_one_line_before_any_rank(args, message, command, capsys, monkeypatch, tmp_path):
    def no_spawn(*a, **kw):
        raise AssertionError("ranks were spawned for a bad value")
    monkeypatch.setattr(runner, "spawn_ranks", no_spawn)
    monkeypatch.chdir(tmp_path)  # profile's default --out must not be created here either
    rc, out, err = main_in_process([command, *SMALL, *args], capsys)
    assert rc == 2, err
    assert message in err and err.startswith("fastattn-dist"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert out == "" and os.listdir(tmp_path) == []


def test_shapes_are_checked_against_the_launchers_world_size(monkeypatch):
    """Under torchrun --world-size does not apply: 9 heads fit 3 ranks, although the option's default is 2."""
    args = cli.build_parser().parse_args(["demo", "--hidden", "144", "--heads", "9", "--kv-heads", "3"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert BlockConfig.from_args(args, launch_from_args(args)).world_size == 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"divisible by the world size \(2\)"):
        BlockConfig.from_args(args, launch_from_args(args))


def test_demo_one_rank_says_there_is_no_comm_and_no_check(capsys):
    """World size 1: no comm (exposed 0 in both runs, no speedup), and --no-check skips the reference."""
    rc, out, err = main_in_process(["demo", "-n", "1", *SMALL, "--no-check", "--json"], capsys)
    assert rc == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert "max_rel_err" not in s and "tiled_max_rel_err" not in s
    assert s["sequential_exposed_comm_ms"] == 0.0 and s["tiled_exposed_comm_ms"] == 0.0
    assert s["speedup"] is None
    assert s["auto_chose_one_tile"] is True and s["num_tiles"] == 1   # auto never tiles one rank
    rc, out, err = main_in_process(["demo", "-n", "1", *SMALL, "--no-check"], capsys)
    assert rc == 0, err
    assert "there is no comm to hide" in out and "not checked (--no-check)" in out
    assert not any(line.startswith("speedup") for line in out.splitlines())   # no "speedup 1.00x" line


def test_demo_json_reports_spread_and_whether_auto_chose_one_tile(capsys):
    rc, out, err = main_in_process(["demo", *SMALL, "--repeats", "3", "--json"], capsys)
    assert rc == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["auto_chose_one_tile"] == (s["config"]["tiles"] == "auto" and s["num_tiles"] == 1)
    for run in ("sequential", "tiled"):
        spread = s["spread"][run]
        assert spread["min_ms"] <= spread["median_ms"] <= spread["max_ms"]
        assert spread["median_ms"] == s[f"{run}_ms"]
    if s["num_tiles"] == 1:
        assert s["speedup"] is None
    rc, out, err = main_in_process(["demo", *SMALL, "--tiles", "1", "--json"], capsys)
    assert rc == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["auto_chose_one_tile"] is False and s["speedup"] is None   # the same block twice: no speedup
