"""scripts/bench_int8_block_model.py's own code paths on CPU (--smoke: tiny shapes, the torch 8-bit path), so the
GPU run does not find a broken script: it runs, checks itself and writes its files."""
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "bench_int8_block_model.py")


def test_block_and_model_bench_smoke(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SELF-CHECK: PASS" in r.stdout
    res = json.loads((tmp_path / "bench_int8_block_model.json").read_text())
    assert {c["name"] for c in res["checks"]} >= {"block S=96 int8 vs bf16", "model int8 KV decode logits"}
    assert all(c["ok"] for c in res["checks"])
    assert set(res["model"]["decode_tokens_per_s"]) == {"bf16", "int8 attention", "int8 KV cache"}
    assert (tmp_path / "bench_int8_block_model.md").read_text().startswith("# 8-bit attention")
