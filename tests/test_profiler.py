"""The overlap profiler: metrics on hand-made spans, trace schema, PNG, bad inputs, zero cost when off, CLI."""
import errno
import json
import os
import sys
from contextlib import contextmanager

import pytest
import torch

import fastattn_dist as fa
from conftest import run_cli
from fastattn_dist.parallel.comm import CommHandle
from fastattn_dist import recorder as recorder_mod
from fastattn_dist.profiler.export import chrome_trace, write_outputs
from fastattn_dist.profiler.gather import ClockOffset, Profile, align, gather_profile
from fastattn_dist.profiler.metrics import (compute_metrics, format_runs, format_tiles, intersect, length,
                                            rank_step_metrics, subtract, union, validate)
from fastattn_dist.profiler.plot import timeline_png
from fastattn_dist.recorder import BLOCK, COMM, COMPUTE, Span, SpanRecorder, TorchProfilerRecorder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--seq", "256", "--hidden", "256", "--heads", "8", "--kv-heads", "4", "--repeats", "2", "--warmup", "1"]


# -- helpers -------------------------------------------------------------------------------------
def blk(a, b, rank=0, run="tiled", step=0):
    return Span("block", BLOCK, -1, a, b, rank, run, step=step)


def cmp(name, tile, a, b, rank=0, run="tiled", step=0):
    return Span(name, COMPUTE, tile, a, b, rank, run, step=step)


def comm(tile, a, b, rank=0, run="tiled", step=0, nbytes=1000, issue=None):
    return Span("allreduce", COMM, tile, a, b, rank, run, nbytes, issue_us=a if issue is None else issue, step=step)


def fully_hidden(rank=0, run="tiled", off=0.0, step=0):
    """Tile 0's all-reduce runs entirely under tile 1's attention."""
    k = dict(rank=rank, run=run, step=step)
    return [blk(off + 0, off + 100, **k), cmp("qkv", -1, off + 0, off + 10, **k),
            cmp("attention", 0, off + 10, off + 40, **k), cmp("o_proj", 0, off + 40, off + 50, **k),
            cmp("attention", 1, off + 50, off + 80, **k), cmp("o_proj", 1, off + 80, off + 95, **k),
            comm(0, off + 50, off + 80, **k)]


def partial(rank=0, run="tiled", off=0.0, step=0):
    """Compute [0,40] and [50,80]; comm t0 [30,60] (10 exposed of 30), comm t1 [80,95] (all exposed)."""
    k = dict(rank=rank, run=run, step=step)
    return [blk(off + 0, off + 100, **k), cmp("attention", 0, off + 0, off + 30, **k),
            cmp("o_proj", 0, off + 30, off + 40, **k), cmp("attention", 1, off + 50, off + 70, **k),
            cmp("o_proj", 1, off + 70, off + 80, **k), comm(0, off + 30, off + 60, issue=off + 25, **k),
            comm(1, off + 80, off + 95, **k)]


def sequential(rank=0, off=0.0, step=0):
    """One tile: compute [0,60], comm [60,90]: fully exposed."""
    k = dict(rank=rank, run="sequential", step=step)
    return [blk(off + 0, off + 100, **k), cmp("qkv", -1, off + 0, off + 10, **k),
            cmp("attention", 0, off + 10, off + 50, **k), cmp("o_proj", 0, off + 50, off + 60, **k),
            comm(0, off + 60, off + 90, nbytes=4000, **k)]


def two_rank_profile():
    spans = sequential(0) + sequential(1, off=3) + partial(0, off=200) + partial(1, off=205)
    clocks = [ClockOffset(0, 0.0, 0.0), ClockOffset(1, 0.0, 5.0)]
    return Profile(2, spans, clocks, "gloo", {"device": "cpu", "describe": "hand-made"})


def check_trace_schema(trace: dict) -> None:
    """Every event complete, every process and thread named, flows pair up and land on their spans."""
    events = trace["traceEvents"]
    json.dumps(trace, allow_nan=False)
    procs = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    xs = [e for e in events if e["ph"] == "X"]
    assert xs
    for e in events:
        assert e["ph"] in ("X", "M", "s", "f"), e
        for key in ("name", "pid", "tid"):
            assert key in e, (key, e)
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0, e
            assert e["pid"] in procs and (e["pid"], e["tid"]) in threads, e
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0, e
            assert "tile" in e["args"], e
            if e["cat"] == "comm":
                assert e["args"]["bytes"] > 0, e
    assert {"compute", "comm (all-reduce)"} <= set(threads.values())
    flows = {}
    for e in events:
        if e["ph"] in "sf":
            flows.setdefault(e["id"], []).append(e)
    assert flows, "no flow arrows"
    for fid, pair in flows.items():
        assert sorted(p["ph"] for p in pair) == ["f", "s"], pair
        s, f = sorted(pair, key=lambda p: p["ph"] != "s")
        assert s["name"] == f["name"] and s["cat"] == f["cat"] and f.get("bp") == "e"
        # Each end sits inside its slice: the o_proj on compute, the all-reduce on comm.
        src = [x for x in xs if x["pid"] == s["pid"] and x["tid"] == s["tid"] and x["ts"] <= s["ts"] <= x["ts"] + x["dur"]]
        dst = [x for x in xs if x["pid"] == f["pid"] and x["tid"] == f["tid"] and x["ts"] <= f["ts"] <= x["ts"] + x["dur"]]
        assert any(x["name"].startswith("o_proj") for x in src), s
        assert any(x["name"].startswith("allreduce") and x["cat"] == "comm" for x in dst), f


# -- interval arithmetic and metrics ---------------------------------------------------------------
def test_interval_arithmetic():
    assert union([(5, 7), (0, 2), (1, 3), (3, 4), (8, 8)]) == [(0, 4), (5, 7)]
    assert length([(0, 10), (5, 15)]) == 15
    assert intersect([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]
    assert subtract([(0, 10), (20, 30)], [(5, 25)]) == [(0, 5), (25, 30)]
    assert subtract([(0, 10)], [(0, 10)]) == []
    assert subtract([(0, 10)], []) == [(0, 10)]


def test_metrics_fully_hidden():
    m = rank_step_metrics(fully_hidden())
    assert m["block_us"] == 100 and m["compute_us"] == 95 and m["comm_us"] == 30
    assert m["exposed_comm_us"] == 0 and m["hidden_comm_us"] == 30 and m["overlap_fraction"] == 1.0
    assert m["bubble_us"] == 5


def test_metrics_fully_exposed():
    m = rank_step_metrics(sequential())
    assert m["compute_us"] == 60 and m["comm_us"] == 30 and m["exposed_comm_us"] == 30
    assert m["overlap_fraction"] == 0.0 and m["bubble_us"] == 10
    assert m["block_us"] == m["compute_us"] + m["exposed_comm_us"] + m["bubble_us"]


def test_metrics_partial_overlap_and_tiles():
    m = rank_step_metrics(partial())
    assert m["compute_us"] == 70 and m["comm_us"] == 45
    assert m["exposed_comm_us"] == 25 and m["hidden_comm_us"] == 20
    assert m["overlap_fraction"] == pytest.approx(20 / 45, rel=1e-12)
    assert m["bubble_us"] == 5  # [95, 100]; [40, 50] is covered by comm
    t0, t1 = m["tiles"]
    assert (t0["attention_us"], t0["o_proj_us"], t0["comm_us"], t0["exposed_comm_us"], t0["queued_us"]) == (30, 10, 30, 10, 5)
    assert (t1["comm_us"], t1["exposed_comm_us"], t1["bytes"]) == (15, 15, 1000)


def test_run_metrics_two_ranks_and_speedup():
    prof = two_rank_profile()
    out = compute_metrics(prof.spans, 2)
    tiled, seq = out["runs"]["tiled"], out["runs"]["sequential"]
    assert tiled["tiles"] == 2 and seq["tiles"] == 1 and tiled["iterations"] == 1
    assert tiled["exposed_comm_ms"] == pytest.approx(0.025) and tiled["comm_ms"] == pytest.approx(0.045)
    assert tiled["overlap_fraction"] == pytest.approx(20 / 45)
    assert seq["exposed_comm_ms"] == pytest.approx(0.030) and seq["overlap_fraction"] == 0.0
    assert out["speedup"] == pytest.approx(1.0)
    assert [r["rank"] for r in tiled["per_rank"]] == [0, 1]
    assert [t["tile"] for t in tiled["per_tile"]] == [0, 1]
    assert tiled["per_tile"][0]["exposed_comm_ms"] == pytest.approx(0.010)
    table = format_runs(out)
    assert "sequential" in table and "44.4%" in table and "0.0%" in table
    assert "attention ms" in format_tiles(tiled)


def test_run_metrics_picks_the_median_iteration():
    spans = []
    for step, scale in enumerate((1.0, 3.0, 2.0)):  # block times 100, 300, 200: the median is step 2
        spans += [blk(1000 * step, 1000 * step + 100 * scale, step=step),
                  cmp("attention", 0, 1000 * step, 1000 * step + 50 * scale, step=step)]
    m = compute_metrics(spans)["runs"]["tiled"]
    assert m["step"] == 2 and m["block_ms"] == pytest.approx(0.2)
    assert m["block_ms_per_iteration"] == pytest.approx([0.1, 0.3, 0.2])
    assert m["overlap_fraction"] is None and m["comm_ms"] == 0  # one rank: nothing to overlap


# -- bad inputs ----------------------------------------------------------------------------------------
def test_empty_run_is_an_error():
    with pytest.raises(ValueError, match="empty run"):
        validate([])
    with pytest.raises(ValueError, match="empty run"):
        compute_metrics([])
    with pytest.raises(ValueError, match="empty run"):
        gather_profile([], ClockOffset(0, 0.0, 0.0))  # one process, no process group
    with pytest.raises(ValueError, match="no 'block' span"):
        validate([cmp("attention", 0, 0, 1)])


def test_mismatched_tile_counts_between_ranks():
    spans = fully_hidden(0) + [s for s in fully_hidden(1) if s.tile != 1]
    with pytest.raises(ValueError, match=r"mismatched tile counts between ranks.*rank 0: 2 tiles, rank 1: 1 tiles"):
        compute_metrics(spans, 2)


def test_missing_rank_and_iterations():
    with pytest.raises(ValueError, match=r"no spans from rank\(s\) \[1\]"):
        validate(fully_hidden(0), world_size=2)
    with pytest.raises(ValueError, match="different iterations"):
        validate(fully_hidden(0) + fully_hidden(1) + fully_hidden(1, off=500, step=1))
    with pytest.raises(ValueError, match="several block spans"):
        validate(fully_hidden(0) + fully_hidden(0, off=500))


def test_write_outputs_is_all_or_nothing(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(TypeError):
        write_outputs(str(out), {"trace.json": b"{}", "timeline.png": None, "metrics.json": b"{}"})
    assert os.listdir(out) == []  # neither finished files nor temporaries
    paths = write_outputs(str(out), {"a.json": b"1", "b.json": b"2"})
    assert sorted(os.listdir(out)) == ["a.json", "b.json"] and len(paths) == 2


def test_unwritable_out_fails_before_ranks_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run_cli("profile", "--out", str(blocker / "sub"), *SMALL, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "is not a writable directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "[profile]" not in r.stderr  # no rank ran


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["open", "replace"])
def test_full_disk_while_writing_is_a_value_error(tmp_path, monkeypatch, where):
    from fastattn_dist.profiler import export

    if where == "open":
        monkeypatch.setattr(export, "open", no_space, raising=False)
    else:
        monkeypatch.setattr(export.os, "replace", no_space)
    with pytest.raises(ValueError, match=f"could not write the profile to {tmp_path}: No space left on device"):
        write_outputs(str(tmp_path), {"a.json": b"1", "b.json": b"2"})
    assert os.listdir(tmp_path) == []  # no temporaries left behind


def test_cli_profile_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """The disk fills up after the ranks ran: exit code 2 and one line, not an OSError traceback."""
    from fastattn_dist import cli
    from fastattn_dist.profiler import export

    monkeypatch.setattr(export, "open", no_space, raising=False)
    rc = cli.main(["profile", "-n", "1", "--out", str(tmp_path), *SMALL, "--repeats", "1", "--warmup", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"fastattn-dist: error: could not write the profile to {tmp_path}: No space left on device\n"


def test_cli_profile_one_rank_prints_no_speedup(tmp_path):
    """Two identical 1-tile runs: their ratio is noise, so no speedup, and the report says why."""
    r = run_cli("profile", "-n", "1", "--out", str(tmp_path), *SMALL, "--repeats", "1", "--warmup", "0")
    assert r.returncode == 0, r.stderr
    assert "no comm at world size 1" in r.stdout
    assert "speedup" not in r.stdout
    assert "speedup" not in json.loads((tmp_path / "metrics.json").read_text())


# -- export -----------------------------------------------------------------------------------------------
def test_trace_schema_hand_made():
    prof = two_rank_profile()
    trace = chrome_trace(prof)
    check_trace_schema(trace)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {"sequential / rank 0", "sequential / rank 1", "tiled / rank 0", "tiled / rank 1"}
    exposed = [e for e in trace["traceEvents"] if e.get("cat") == "exposed" and e["pid"] == 3]
    assert sum(e["dur"] for e in exposed) == pytest.approx(25)  # tiled rank 0: 10 + 15
    one = chrome_trace(prof, ["tiled"])
    assert {e["args"]["name"] for e in one["traceEvents"] if e["name"] == "process_name"} == {"rank 0", "rank 1"}
    with pytest.raises(ValueError, match="no spans for run"):
        chrome_trace(prof, ["nope"])


def test_png_hand_made():
    prof = two_rank_profile()
    metrics = compute_metrics(prof.spans, 2)
    png = timeline_png(prof, metrics, title="hand-made")
    assert png[:8] == PNG_MAGIC and len(png) > 5000


def test_align_moves_spans_onto_rank0_clock():
    s = comm(0, 10.0, 20.0, rank=1, issue=5.0)
    (a,) = align([s], ClockOffset(1, 100.0, 2.0))
    assert (a.start_us, a.end_us, a.issue_us, a.rank) == (110.0, 120.0, 105.0, 1)
    assert s.start_us == 10.0  # the original is untouched


# -- recording: zero cost when off, record_function variant ------------------------------------------
@contextmanager
def counting():
    """Count every call the profiling machinery could make: clocks, CUDA events, syncs, spans, callbacks."""
    counts = {k: 0 for k in ("perf_counter", "cuda_event", "cuda_sync", "begin", "end", "comm", "mark_done",
                             "record_function")}
    saved = []

    def patch(obj, name, key):
        orig = getattr(obj, name)

        def wrapper(*a, **kw):
            counts[key] += 1
            return orig(*a, **kw)
        saved.append((obj, name, orig))
        setattr(obj, name, wrapper)

    class Clock:  # stands in for the recorder module's `time`
        def __getattr__(self, n):
            import time
            return getattr(time, n)

        @staticmethod
        def perf_counter():
            import time
            counts["perf_counter"] += 1
            return time.perf_counter()

    saved.append((recorder_mod, "time", recorder_mod.time))
    recorder_mod.time = Clock()
    patch(torch.cuda, "Event", "cuda_event")
    patch(torch.cuda, "synchronize", "cuda_sync")
    patch(torch.autograd.profiler, "record_function", "record_function")
    for m in ("begin", "end", "comm"):
        patch(SpanRecorder, m, m)
    patch(CommHandle, "_mark_done", "mark_done")
    try:
        yield counts
    finally:
        for obj, name, orig in reversed(saved):
            setattr(obj, name, orig)


def small_block():
    from rank_jobs import make_weights

    torch.manual_seed(0)
    block = fa.TPAttention(64, 4, 2, tiles=3)
    block.load_full_weights(*make_weights(64, 4, 2))
    return block, torch.randn(1, 48, 64)


def test_recording_off_makes_no_calls():
    block, x = small_block()
    assert block.recorder is None
    with counting() as off:
        block(x)
    assert all(v == 0 for v in off.values()), off
    block.recorder = SpanRecorder()
    with counting() as on:
        block(x)
    # the block, then per tile its q/k/v, attention and o_proj
    assert on["begin"] == on["end"] == 1 + 3 * 3 and on["perf_counter"] == 2 * on["begin"]
    assert on["record_function"] == 0 and on["cuda_event"] == 0  # the plain recorder on CPU
    spans = block.recorder.spans()
    assert [s.name for s in spans if s.lane == COMPUTE].count("attention") == 3


def test_torch_profiler_recorder_puts_ranges_in_the_trace(tmp_path):
    from torch.profiler import ProfilerActivity, profile

    block, x = small_block()
    block.recorder = TorchProfilerRecorder()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block(x)
    path = tmp_path / "t.json"
    prof.export_chrome_trace(str(path))
    names = {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}
    for n in ("fastattn::block", "fastattn::qkv[t0]", "fastattn::attention[t0]", "fastattn::o_proj[t2]"):
        assert n in names, n
    assert len(block.recorder.spans()) == 1 + 3 * 3  # and it still records our spans


# -- the CLI end to end --------------------------------------------------------------------------------------
def test_cli_profile_compare_end_to_end(tmp_path):
    out = tmp_path / "prof"
    r = run_cli("profile", "--out", str(out), "--compare", "--torch-profiler", "--tiles", "3", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "exposed comm ms" in r.stdout and "per tile" in r.stdout and "speedup" in r.stdout
    assert sorted(os.listdir(out)) == ["metrics.json", "timeline.png", "torch_trace_rank0.json",
                                       "torch_trace_rank1.json", "trace.json"]
    trace = json.loads((out / "trace.json").read_text())
    check_trace_schema(trace)
    procs = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert procs == {"sequential / rank 0", "sequential / rank 1", "tiled / rank 0", "tiled / rank 1"}
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["shown_runs"] == ["sequential", "tiled"]
    assert m["runs"]["tiled"]["tiles"] == 3 and m["runs"]["sequential"]["tiles"] == 1
    assert m["runs"]["tiled"]["iterations"] == 2 and len(m["runs"]["tiled"]["per_tile"]) == 3
    assert m["speedup"] > 0 and len(m["clock_offsets"]) == 2
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    torch_names = (out / "torch_trace_rank1.json").read_text()
    assert "fastattn::attention[t2]" in torch_names


def test_render_without_matplotlib_skips_only_the_png(monkeypatch):
    from fastattn_dist.profiler.report import render

    files, summary = render(two_rank_profile(), True, {})
    assert sorted(files) == ["metrics.json", "timeline.png", "trace.json"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    files, summary = render(two_rank_profile(), False, {})
    assert sorted(files) == ["metrics.json", "trace.json"]
    assert summary["timeline_png"].startswith("not written: matplotlib")
    assert json.loads(files["metrics.json"])["shown_runs"] == ["tiled"]


def test_render_one_tile_plan_has_no_speedup():
    """A tiled run of one tile is the sequential block again: no speedup in the report or the files."""
    from dataclasses import replace

    from fastattn_dist.profiler.report import render

    seq = sequential(0) + sequential(1, off=3)
    tiled = [replace(s, run="tiled", start_us=s.start_us + 200, end_us=s.end_us + 200,
                     issue_us=None if s.issue_us is None else s.issue_us + 200) for s in seq]
    prof = Profile(2, seq + tiled, [ClockOffset(0, 0.0, 0.0), ClockOffset(1, 0.0, 5.0)], "gloo", {})
    files, summary = render(prof, True, {})
    assert "speedup" not in summary and "one tile" in summary["note"]
    assert json.loads(files["trace.json"])["otherData"]["speedup"] is None
