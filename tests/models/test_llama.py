"""The TP Llama-family model against Hugging Face transformers (the oracle), float32 on CPU gloo ranks:
logits of prefill and of 16 decode steps, greedy tokens, batches of different lengths, tiled == 1 tile."""
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import model_jobs by name

from fastattn_dist import spawn_ranks  # noqa: E402
from model_jobs import model_outputs  # noqa: E402


def rel_err(out, ref):
    """max |out - ref| / max |ref|."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max()).item()

TOL = 1e-4  # float32, relative to the largest logit
STEPS = 16


def _init(model, seed):
    """Weights large enough that logits differ by far more than float32 noise (greedy is then stable)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5 * (4.0 if "embed" in name else 1.0))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


CONFIGS = {
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=4)),
    "llama3_rope": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=4, rope_theta=500000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "linear_rope_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4,
                                            rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2_bias_tied": ("Qwen2Config", dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral_window": ("MistralConfig", dict(num_attention_heads=8, num_key_value_heads=4, sliding_window=7)),
}


def make_checkpoint(root, name):
    cls_name, extra = CONFIGS[name]
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(extra)
    cfg = getattr(transformers, cls_name)(**kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    _init(model, seed=len(name))
    path = str(root / name)
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def hf_reference(model, prompts, lengths, steps):
    """Per prompt (alone, unpadded): prefill logits, greedy tokens and the logits of each decode step."""
    out = []
    for p, n in zip(prompts, lengths):
        ids = torch.tensor([p[:n]])
        with torch.no_grad():
            pre = model(ids).logits[0]
            gen = model.generate(ids, max_new_tokens=steps + 1, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 min_new_tokens=steps + 1)[0, n:].tolist()
            full = torch.tensor([p[:n] + gen])
            logits = model(full).logits[0, n - 1:]  # the logits that chose each generated token
        out.append({"prefill": pre, "tokens": gen, "step_logits": logits})
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {name: make_checkpoint(root, name) for name in CONFIGS}


PROMPTS = [[5, 17, 3, 44, 9, 60, 21, 8, 33, 71, 2, 12, 90, 14, 6, 39, 27, 50, 11],
           [7, 81, 19, 4, 58, 22, 13, 95, 30, 1, 46]]


@pytest.mark.parametrize("name,world", [("llama_gqa", 1), ("llama_gqa", 2), ("llama3_rope", 2), ("linear_rope_mha", 4),
                                        ("qwen2_bias_tied", 2), ("mistral_window", 1), ("llama_gqa", 4)])
def test_matches_transformers(checkpoints, name, world):
    hf_model, path = checkpoints[name]
    S = max(len(p) for p in PROMPTS)
    padded = [p + [0] * (S - len(p)) for p in PROMPTS]
    lengths = [len(p) for p in PROMPTS]
    ref = hf_reference(hf_model, PROMPTS, lengths, STEPS)
    res = spawn_ranks(model_outputs, world, (path, padded, lengths, STEPS, (1, 3), None), timeout_s=120)
    ours = res[0]
    for b, (r, n) in enumerate(zip(ref, lengths)):
        for t, logits in ours["prefill"].items():  # every real position of each padded prompt
            err = rel_err(logits[b, :n], r["prefill"])
            assert err < TOL, f"{name} world {world} tiles {t} prompt {b}: prefill logits off by {err:.2e}"
        got_tokens = [step[b] for step in ours["tokens"]]
        assert got_tokens == r["tokens"], f"{name} world {world} prompt {b}: greedy tokens differ"
        for s, logits in enumerate(ours["decode_logits"]):
            err = rel_err(logits[b], r["step_logits"][s])
            assert err < TOL, f"{name} world {world} prompt {b} step {s}: decode logits off by {err:.2e}"
        assert ours["generate"][b] == r["tokens"], f"{name} world {world}: generate() differs from transformers"
    assert ours["plans"][3] != ours["plans"][1] and len(ours["plans"][3]) == 4
    for r in range(1, world):  # every rank holds the same logits
        assert torch.equal(res[r]["prefill"][1], ours["prefill"][1])
        assert res[r]["tokens"] == ours["tokens"]


def test_batch_of_different_lengths_equals_each_alone(checkpoints):
    _, path = checkpoints["llama_gqa"]
    S = max(len(p) for p in PROMPTS)
    padded = [p + [0] * (S - len(p)) for p in PROMPTS]
    both = spawn_ranks(model_outputs, 2, (path, padded, [len(p) for p in PROMPTS], 4, (1,), None), timeout_s=120)[0]
    for b, p in enumerate(PROMPTS):
        alone = spawn_ranks(model_outputs, 2, (path, [p], None, 4, (1,), None), timeout_s=120)[0]
        assert rel_err(both["prefill"][1][b, :len(p)], alone["prefill"][1][0]) < TOL
        assert [s[b] for s in both["tokens"]] == [s[0] for s in alone["tokens"]]
        assert both["generate"][b] == alone["generate"][0]
