"""`fastattn-dist generate` and `bench-model` as users run them: spawned CPU gloo ranks, --json output, and
bad input answered with one line and rc 2 before any rank starts."""
import json
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import run_cli  # noqa: E402

import fastattn_dist  # noqa: E402
from fastattn_dist.models import tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


def last_json(r):
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_generate_json_equals_the_api_at_world_size_2(tiny):
    prompts = [[5, 17, 33, 9], [40, 2]]
    r = run_cli("generate", "--model", tiny, "--prompt-ids", "5,17,33,9", "--prompt-ids", "40,2",
                "--max-new-tokens", "6", "--stop-tokens", "--world-size", "2", "--json")
    out = last_json(r)
    assert out["world_size"] == 2
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    with torch.no_grad():
        want = fastattn_dist.LlamaForCausalLM.from_pretrained(tiny).generate(prompts, 6, stop_tokens=[])
    assert out["tokens"] == want and all(len(t) == 6 for t in want)


def test_generate_with_a_text_prompt_prints_text(tiny):
    r = run_cli("generate", "--model", tiny, "--prompt", "hello world", "--max-new-tokens", "4", "--world-size", "1",
                "--json")
    out = last_json(r)
    assert len(out["tokens"]) == 1 and 1 <= len(out["tokens"][0]) <= 4
    assert "tokens/s" in r.stderr + r.stdout


@pytest.mark.parametrize("args, match", [
    (["--model", "/nonexistent/ckpt", "--prompt-ids", "1,2"], "not a checkpoint directory"),
    (["--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["--prompt-ids", ","], "empty"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "100000"], "exceeds"),
    (["--prompt-ids", "1,2", "--world-size", "3"], "divisible|divide"),
    (["--prompt-ids", "1,2", "--temperature", "-1"], "--temperature"),
    (["--prompt-ids", "1,2", "--top-p", "1.5"], "--top-p"),
    (["--prompt-ids", "1,2", "--stop-tokens", "99999"], "--stop-tokens"),
])
def test_generate_bad_input_is_one_line_and_rc_2(tiny, args, match):
    assert_one_line_error("generate", tiny, args, match)


def assert_one_line_error(command, tiny, args, match):
    """The CLI answers with one error line naming the problem and exit code 2 (before any rank starts)."""
    if "--model" not in args:
        args = ["--model", tiny, *args]
    r = run_cli(command, *args, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and "error" in err[0] and re.search(match, err[0]), r.stderr


def test_bench_model_times_ours_tiles1_and_transformers(tiny):
    r = run_cli("bench-model", "--model", tiny, "--world-size", "1", "--seq", "40", "--repeats", "1", "--warmup", "0",
                "--decode-tokens", "2", "--json")
    out = last_json(r)
    assert set(out["prefill_ms"]) == {"ours", "ours_tiles1", "hf_eager", "hf_sdpa"}
    assert all(v > 0 for v in out["prefill_ms"].values())
    assert out["decode_tokens_per_s"]["ours"] > 0 and out["decode_tokens_per_s"]["hf_sdpa"] > 0
    assert out["plan"][0] == 0 and out["plan"][-1] == 40
    assert "| ours_tiles1 |" in r.stdout


def test_bench_model_long_context_reports_the_tier_split(tiny):
    r = run_cli("bench-model", "--model", tiny, "--world-size", "2", "--context", "48", "--kv-offload", "off", "16",
                "--decode-tokens", "2", "--json")
    out = last_json(r)
    off, split = out["runs"]
    assert off["kv_offload"] == "off" and off["kv_host_gib"] == 0 and off["decode_host"] is None
    assert split["gpu_tokens"] == 16 and split["kv_host_gib"] > 0 and split["decode_host"] in ("cpu", "stream")
    assert split["decode_tokens_per_s"] > 0 and split["prefill_tokens_per_s"] > 0


def test_bench_model_context_max_fills_the_host_budget(tiny):
    """``--context max`` on CPU with 16 device tokens: the cache is 16 tokens plus what the host budget holds (whole
    blocks), computed from the sizes; the run then prefills and decodes it, reporting the bound it was held to."""
    from fastattn_dist.models.offload_plan import GIB, host_capacity

    budget_gb = 0.002  # about 1000 host tokens
    r = run_cli("bench-model", "--model", tiny, "--world-size", "1", "--context", "max", "--kv-offload", "16",
                "--host-budget-gb", str(budget_gb), "--decode-tokens", "3", "--json")
    (run,) = last_json(r)["runs"]
    per_token = 2 * 4 * 4 * 16 * 4   # K and V x 4 layers x 4 kv heads x head_dim 16 x fp32
    want = 16 + host_capacity(int(budget_gb * GIB), per_token)
    assert run["context_max"]["cache_tokens"] == want == run["context"] + 3
    assert run["context_max"]["share_of_bound"] > 0.95 and run["gpu_tokens"] == 16
    assert run["decode_tokens_per_s"] > 0 and run["decode_host"] == "cpu" and run["kv_host_gib"] > 0
    assert "the longest both tiers hold" in r.stderr and "--context max" in r.stdout


@pytest.mark.parametrize("args, match", [
    (["--context", "64", "--kv-offload", "16", "--host-budget-gb", "0.000001"], r"host tier needs .* over the host "
                                                                               r"budget of 0.0 GiB"),
    (["--context", "64", "--kv-offload", "16", "--gpu-budget-gb", "20"], "caps a GPU's memory: this run is on CPU"),
    (["--host-budget-gb", "1"], "go with --context"),
    (["--context", "lots"], "or 'max'"),
    (["--context", "max", "--kv-offload", "off"], "needs a GPU"),
    (["--context", "64", "--kv-offload", "16", "--attn-precision", "int8"], "does not go with a host KV tier"),
])
def test_bench_model_budgets_are_checked_before_ranks_start(tiny, args, match):
    assert_one_line_error("bench-model", tiny, ["--world-size", "1", *args], match)


@pytest.mark.parametrize("args, match", [
    (["--prompt-ids", "1,2,3", "--kv-offload", "2", "--host-budget-gb", "0.0000001"], "over the host budget"),
    (["--prompt-ids", "1,2", "--gpu-budget-gb", "4"], "caps a GPU's memory"),
    (["--prompt-ids", "1,2", "--kv-offload", "2", "--attn-precision", "int8"], "does not go with a host KV tier"),
])
def test_generate_budgets_are_checked_before_ranks_start(tiny, args, match):
    assert_one_line_error("generate", tiny, ["--world-size", "1", *args], match)


@pytest.mark.parametrize("args, match", [
    (["--model", "7b", "--world-size", "1"], "needs a GPU"),
    (["--layers", "2"], "--layers"),
    (["--context", "64", "--kv-offload", "foo"], "--kv-offload takes"),
    (["--context", "64", "--kv-offload", "auto"], "this run is on CPU"),
    (["--kv-offload", "16"], "goes with --context"),
    (["--seq", "5000"], "exceeds the model's context"),
    (["--context", "4096"], "exceeds the model's context"),
])
def test_bench_model_bad_input_is_one_line_and_rc_2(tiny, args, match):
    assert_one_line_error("bench-model", tiny, args, match)


def test_bench_model_writes_its_json_for_a_checkpoint_path(tiny, tmp_path):
    r = run_cli("bench-model", "--model", tiny, "--world-size", "1", "--context", "40", "--kv-offload", "off",
                "--decode-tokens", "2", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "out" / "bench_context_ckpt.json") as f:
        assert json.load(f)["runs"][0]["context"] == 40


def test_generate_streams_one_prompt_and_prints_a_batch_at_the_end(tiny):
    """Without --json, rank 0 streams a single prompt's text as it is decoded; the printed text is the prompt plus
    exactly the tokens --json reports. A batch is printed prompt by prompt."""
    from tokenizers import Tokenizer
    from fastattn_dist.models.checkpoint import Checkpoint

    tok = Tokenizer.from_file(Checkpoint(tiny).tokenizer_file)
    args = ["generate", "--model", tiny, "--prompt-ids", "5,17,33,9", "--max-new-tokens", "7", "--stop-tokens",
            "--world-size", "2"]
    streamed = run_cli(*args)
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    new = last_json(run_cli(*args, "--json"))["tokens"][0]
    assert streamed.stdout == f"[0] {tok.decode([5, 17, 33, 9] + new, skip_special_tokens=True)}\n"
    batch = run_cli("generate", "--model", tiny, "--prompt-ids", "5,17", "--prompt-ids", "40,2,8",
                    "--max-new-tokens", "3", "--world-size", "1")
    lines = batch.stdout.splitlines()
    assert batch.returncode == 0 and [ln[:4] for ln in lines] == ["[0] ", "[1] "], batch.stdout


def test_token_stream_holds_back_split_characters(capsys):
    """A character whose bytes span tokens decodes as U+FFFD until its last byte: never printed half."""
    from fastattn_dist.cli.generate import TokenStream

    class Tok:  # decodes ids as bytes: 0xC3 0xA9 is "é"
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    s = TokenStream(None, [[ord("a")]], 3)
    s.tok, s.shown = Tok(), "a"
    for t in (0xC3, 0xA9, ord("b")):
        s([t])
        if t == 0xC3:
            assert "\ufffd" not in capsys.readouterr().out
    s.close()
    assert capsys.readouterr().out == "éb\n"


def test_transformers_decode_rate_times_its_decode_steps_only():
    """The rate is steps over the time of the single-token forwards: the prefill is outside the timed region, so no
    rate can include it or be negative (it once was: two end-to-end timings subtracted on a busy machine)."""
    from types import SimpleNamespace
    from fastattn_dist.models.bench_model import hf_decode_tokens_per_s

    calls = []

    def hf(ids, past_key_values=None, use_cache=True, logits_to_keep=None):
        calls.append((ids.shape[1], past_key_values))
        return SimpleNamespace(past_key_values="cache", logits=torch.zeros(ids.shape[0], 1, 8))

    rate = hf_decode_tokens_per_s(hf, torch.ones(2, 9, dtype=torch.long), 5, torch.device("cpu"))
    assert calls == [(9, None)] + [(1, "cache")] * 5 and rate > 0


def test_bench_model_emulates_one_rank_of_tp2_on_cpu(tiny, tmp_path):
    """The code path of ``--emulate-tp`` on CPU (the simulated link as the stand-in): every plan runs, the tiled
    prefill's last logits equal tiles=1's, the table says the comm is modelled. Not a measurement of speed."""
    r = run_cli("bench-model", "--emulate-tp", "2", "--model", tiny, "--seq", "70", "--batch", "2", "--repeats", "1",
                "--warmup", "0", "--decode-tokens", "3", "--tile-counts", "3", "--out", str(tmp_path), "--json")
    out = last_json(r)
    assert out["emulate_tp"] == 2 and out["weights"] == "the checkpoint's" and "simulated link" in out["comm"]
    (row,) = out["rows"]
    assert (row["batch"], row["seq"]) == (2, 70) and row["plans"]["t3"][-1] == 140
    assert set(row["ms"]) == {"tiles1", "auto", "t3", "compute_tiles1", "compute_auto", "comm_tiles1", "comm_auto"}
    assert all(v > 0 for v in row["ms"].values())
    assert row["logits_rel_err"] < 1e-5 and row["ceiling_ms"] >= row["ms"]["compute_auto"]
    assert out["decode"][0]["tokens_per_s"] > 0 and out["decode"][0]["bound_by"] in ("memory", "comm")
    assert "Comm is modelled, not measured" in r.stdout
    assert (tmp_path / "bench_emulated_tp2_ckpt.json").exists()


@pytest.mark.parametrize("args, match", [
    (["--emulate-tp", "3"], "divisible"),
    (["--emulate-tp", "2", "--context", "64"], "--emulate-tp times"),
    (["--seq", "64", "128"], "--seq takes one length"),
    (["--model", "70b"], "needs a GPU"),
])
def test_bench_model_emulation_bad_input_is_one_line(tiny, args, match):
    assert_one_line_error("bench-model", tiny, args, match)


def test_bench_model_standin_options_reach_the_gpu_stand_in():
    """On a GPU, --standin-path and the latency overrides build the stand-in's model (built here without a GPU:
    the model is plain data); a path it does not know is refused by the parser (one line, rc 2)."""
    from fastattn_dist.cli.bench_model import _emulation
    from fastattn_dist.cli import build_parser

    args = build_parser().parse_args(["bench-model", "--model", "8b", "--emulate-tp", "4", "--standin-path",
                                      "copy_engine", "--standin-small-latency-us", "9"])
    m = _emulation(args, gpu=True)["standin"]
    assert m.path == "copy_engine" and m.small_latency_us == 9 and m.latency_us == 131
    assert "no SMs" in m.describe()
    args = build_parser().parse_args(["bench-model", "--model", "8b", "--emulate-tp", "2"])
    assert _emulation(args, gpu=True)["standin"].path == "nccl"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench-model", "--emulate-tp", "2", "--standin-path", "nvls"])
    assert e.value.code == 2
