"""Hugging Face checkpoints of Llama-family models: config parsing, sliced reads, completeness, the tiny model.

transformers is the reference for what a config means and for whether a checkpoint we write is a real one.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastattn_dist.models import SUPPORTED_ARCHITECTURES, Checkpoint, LlamaConfig, tiny_checkpoint
from fastattn_dist.models import checkpoint as ckpt_mod
from fastattn_dist.models.checkpoint import expected_tensors
from fastattn_dist.models.tiny import build_tokenizer, random_checkpoint, tiny_config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# ---------------------------------------------------------------------------------------------------------------
# config.json files as published (transformers 4.x format)
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
LLAMA31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256,
}
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 131072, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}

_BASE = dict(rope_scaling=None, tie_word_embeddings=False, attention_bias=False, o_bias=False, mlp_bias=False,
             hidden_act="silu", sliding_window=None)
EXPECTED = {
    "llama2": (LLAMA2_7B, dict(_BASE, architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=4096,
                               intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                               max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,),
                               torch_dtype="float16")),
    "llama31": (LLAMA31_8B_INSTRUCT, dict(
        _BASE, architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009), torch_dtype="bfloat16",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})),
    "mistral": (MISTRAL_7B_V01, dict(
        _BASE, architecture="MistralForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=32768, sliding_window=4096, bos_token_id=1,
        eos_token_ids=(2,), torch_dtype="bfloat16")),
    "qwen2": (QWEN2_05B, dict(
        _BASE, architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=131072, tie_word_embeddings=True, attention_bias=True,
        bos_token_id=151643, eos_token_ids=(151643,), torch_dtype="bfloat16")),
}

# a small config of each family, for checkpoints written to disk
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
SMALL_QWEN2 = dict(SMALL, architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True, use_sliding_window=True,
                   sliding_window=16, max_window_layers=0, rope_theta=1e6)
SMALL_LLAMA_TIED = dict(SMALL, architectures=["LlamaForCausalLM"], tie_word_embeddings=True)
SMALL_LLAMA_BIAS = dict(SMALL, architectures=["LlamaForCausalLM"], attention_bias=True, mlp_bias=True, head_dim=12,
                        rope_scaling={"type": "linear", "factor": 2.0})
SMALL_MISTRAL = dict(SMALL, architectures=["MistralForCausalLM"], sliding_window=8, head_dim=16)


def fields(cfg: LlamaConfig) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------------------
# config parsing
@pytest.mark.parametrize("which", list(EXPECTED))
def test_published_configs_parse_every_field(which):
    d, want = EXPECTED[which]
    assert set(want) == {f.name for f in dataclasses.fields(LlamaConfig)}
    assert fields(LlamaConfig.from_dict(d)) == want


@pytest.mark.parametrize("which", list(EXPECTED))
def test_to_dict_round_trips_and_transformers_reads_it_the_same(which, tmp_path):
    cfg = LlamaConfig.from_dict(EXPECTED[which][0])
    d = cfg.to_dict()
    assert LlamaConfig.from_dict(json.loads(json.dumps(d))) == cfg
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert LlamaConfig.from_file(tmp_path / "config.json") == cfg
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == cfg.architecture.replace("ForCausalLM", "Config")
    assert fields(_from_hf(hf)) == fields(cfg)


def _from_hf(hf) -> LlamaConfig:
    """Our fields, as transformers understood its config object (the independent reading)."""
    mt = hf.model_type
    rope = dict(hf.rope_parameters)
    theta = rope.pop("rope_theta")
    rope.pop("type", None)
    scaling = None if rope.get("rope_type", "default") == "default" else rope
    if mt == "qwen2":
        slides = [t == "sliding_attention" for t in hf.layer_types]
        window = hf.sliding_window if all(slides) else None
        assert not any(slides) or all(slides)
    else:
        window = getattr(hf, "sliding_window", None)
    eos = hf.eos_token_id
    dtype = hf.dtype if isinstance(hf.dtype, str) or hf.dtype is None else str(hf.dtype).replace("torch.", "")
    return LlamaConfig(
        architecture={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[mt],
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=hf.rms_norm_eps, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=hf.max_position_embeddings, tie_word_embeddings=hf.tie_word_embeddings,
        attention_bias=True if mt == "qwen2" else bool(getattr(hf, "attention_bias", False)),
        o_bias=False if mt == "qwen2" else bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)), hidden_act=hf.hidden_act, sliding_window=window,
        bos_token_id=hf.bos_token_id, eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
        torch_dtype=dtype)


def _expected(architecture, **differs):
    """The fields our config should read: the small test shape and transformers' defaults, but ``differs``."""
    return dict(dict(architecture=architecture, vocab_size=1000, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, head_dim=32, rms_norm_eps=1e-6,
                     rope_theta=10000.0, rope_scaling=None, max_position_embeddings=131072, tie_word_embeddings=False,
                     attention_bias=False, o_bias=False, mlp_bias=False, hidden_act="silu", sliding_window=None,
                     bos_token_id=1, eos_token_ids=(2,), torch_dtype=None), **differs)


def _hf_written_configs():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    small = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_attention_heads=8)
    return {
        "llama": (transformers.LlamaConfig(
            **small, num_hidden_layers=3, num_key_value_heads=2, head_dim=48, max_position_embeddings=131072,
            rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(llama3), attention_bias=True, mlp_bias=True,
            bos_token_id=7, eos_token_id=[8, 9], dtype="bfloat16"),
            _expected("LlamaForCausalLM", num_hidden_layers=3, num_key_value_heads=2, head_dim=48, rms_norm_eps=1e-5,
                      rope_theta=500000.0, rope_scaling=llama3, attention_bias=True, o_bias=True, mlp_bias=True,
                      bos_token_id=7, eos_token_ids=(8, 9), torch_dtype="bfloat16")),
        "llama_defaults": (transformers.LlamaConfig(**small, num_hidden_layers=3),
                           _expected("LlamaForCausalLM", num_hidden_layers=3, max_position_embeddings=2048)),
        "mistral": (transformers.MistralConfig(
            **small, num_hidden_layers=2, num_key_value_heads=4, sliding_window=None, rope_theta=1e6,
            tie_word_embeddings=True),
            _expected("MistralForCausalLM", num_key_value_heads=4, rope_theta=1e6, tie_word_embeddings=True)),
        "mistral_window": (transformers.MistralConfig(**small, num_hidden_layers=2),
                           _expected("MistralForCausalLM", sliding_window=4096)),
        "qwen2": (transformers.Qwen2Config(
            **small, num_hidden_layers=2, num_key_value_heads=2, rope_scaling={"type": "linear", "factor": 2.0},
            tie_word_embeddings=True, eos_token_id=5, dtype="float16"),
            _expected("Qwen2ForCausalLM", num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0},
                      max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
                      bos_token_id=None, eos_token_ids=(5,), torch_dtype="float16")),
        "qwen2_window": (transformers.Qwen2Config(
            **small, num_hidden_layers=2, num_key_value_heads=4, use_sliding_window=True, sliding_window=64,
            max_window_layers=0),
            _expected("Qwen2ForCausalLM", num_key_value_heads=4, max_position_embeddings=32768, attention_bias=True,
                      sliding_window=64, bos_token_id=None, eos_token_ids=())),
    }


def test_configs_written_by_transformers(tmp_path):
    for name, (hf, want) in _hf_written_configs().items():
        d = hf.to_dict()
        assert "rope_parameters" in d and "rope_theta" not in d  # the 5.x form
        cfg = LlamaConfig.from_dict(d)
        assert fields(cfg) == want, name
        assert fields(_from_hf(hf)) == want, name  # and that is what transformers itself means
        # save_pretrained: no "architectures" (model_type is the fallback), "dtype" instead of "torch_dtype"
        hf.save_pretrained(tmp_path / name)
        assert LlamaConfig.from_file(tmp_path / name / "config.json") == cfg
        assert LlamaConfig.from_dict(cfg.to_dict()) == cfg


def test_rope_forms_and_defaults():
    base = dict(SMALL, architectures=["LlamaForCausalLM"])
    assert LlamaConfig.from_dict(base).rope_theta == 10000.0
    assert LlamaConfig.from_dict(dict(base, rope_theta=5e5)).rope_theta == 5e5
    # 5.x: theta inside rope_parameters wins over a top-level key
    c = LlamaConfig.from_dict(dict(base, rope_theta=1.0, rope_parameters={"rope_type": "default", "rope_theta": 7e5}))
    assert (c.rope_theta, c.rope_scaling) == (7e5, None)
    c = LlamaConfig.from_dict(dict(base, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 3e4}))
    assert (c.rope_theta, c.rope_scaling) == (3e4, {"rope_type": "linear", "factor": 4.0})
    # legacy "type" key; llama3 without original_max_position_embeddings takes max_position_embeddings (as HF)
    c = LlamaConfig.from_dict(dict(base, rope_scaling={"type": "linear", "factor": 2.0}))
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    c = LlamaConfig.from_dict(dict(base, max_position_embeddings=4096, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}))
    assert c.rope_scaling["original_max_position_embeddings"] == 4096
    assert LlamaConfig.from_dict(dict(base, rope_scaling={"rope_type": "default"})).rope_scaling is None
    # nested per layer type, all equal: fine
    c = LlamaConfig.from_dict(dict(base, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 9.0}}))
    assert c.rope_theta == 9.0
    # model_type fallback, swish is silu, head_dim null means hidden // heads
    c = LlamaConfig.from_dict(dict(SMALL, model_type="mistral", hidden_act="swish", head_dim=None))
    assert (c.architecture, c.hidden_act, c.head_dim, c.sliding_window) == ("MistralForCausalLM", "silu", 8, 4096)
    c = LlamaConfig.from_dict(dict(SMALL, model_type="qwen2", use_sliding_window=True, sliding_window=32))
    assert c.sliding_window is None  # max_window_layers defaults to 28 >= 2 layers: no layer slides (as HF)
    # a missing num_key_value_heads: num_attention_heads for Llama, but 8 for Mistral and 32 for Qwen2 (as HF)
    no_kv = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
    no_kv.update(num_attention_heads=64, hidden_size=1024)
    got = [LlamaConfig.from_dict(dict(no_kv, model_type=mt)).num_key_value_heads for mt in ("llama", "mistral", "qwen2")]
    assert got == [64, 8, 32]
    for mt in ("llama", "mistral", "qwen2"):
        hf = transformers.AutoConfig.for_model(mt, **no_kv)
        assert LlamaConfig.from_dict(dict(no_kv, model_type=mt)).num_key_value_heads == hf.num_key_value_heads


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}])
def test_parsed_rope_settings_give_transformers_frequencies(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fastattn_dist.rope import inverse_frequencies

    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=64, rope_theta=5e5,
                                  max_position_embeddings=131072, rope_scaling=dict(scaling) if scaling else None)
    cfg = LlamaConfig.from_dict(hf.to_dict())
    kind = hf.rope_parameters["rope_type"]
    if kind == "default":
        ref = 1.0 / 5e5 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    else:
        ref = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")[0]
    ours = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.allclose(ours, ref.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "Gemma2ForCausalLM", "MixtralForCausalLM"])
def test_unsupported_architecture_is_named(arch):
    with pytest.raises(ValueError) as e:
        LlamaConfig.from_dict(dict(LLAMA2_7B, architectures=[arch]))
    msg = str(e.value)
    assert arch in msg and all(a in msg for a in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="gemma2"):
        LlamaConfig.from_dict(dict(SMALL, model_type="gemma2"))
    with pytest.raises(ValueError, match="architectures"):
        LlamaConfig.from_dict(dict(SMALL))


@pytest.mark.parametrize("change, match", [
    (dict(hidden_act="gelu"), "gelu"),
    (dict(num_key_value_heads=6), "num_key_value_heads"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(hidden_size=4096.0), "hidden_size"),
    (dict(num_hidden_layers=True), "num_hidden_layers"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(head_dim=15), "even head_dim"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(rope_scaling=None, rope_parameters={"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}), "longrope"),
    (dict(rope_scaling={"rope_type": "linear"}), "factor"),
    (dict(attention_bias="yes"), "attention_bias"),
])
def test_invalid_configs(change, match):
    d = dict(LLAMA31_8B_INSTRUCT)
    d.update(change)
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_dict(d)


def test_qwen2_sliding_window_on_some_layers_only_is_refused():
    d = dict(SMALL, architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=16,
             max_window_layers=1)
    with pytest.raises(ValueError, match="1 of 2 layers"):
        LlamaConfig.from_dict(d)
    assert LlamaConfig.from_dict(dict(d, max_window_layers=0)).sliding_window == 16
    assert LlamaConfig.from_dict(dict(d, use_sliding_window=False)).sliding_window is None


def test_config_construction_checks_what_hf_can_express():
    c = LlamaConfig.from_dict(SMALL_LLAMA_TIED)
    with pytest.raises(ValueError, match="o_bias"):
        c.replace(attention_bias=True)
    with pytest.raises(ValueError, match="sliding"):
        c.replace(sliding_window=8)
    q = LlamaConfig.from_dict(SMALL_QWEN2)
    with pytest.raises(ValueError, match="Qwen2"):
        q.replace(o_bias=True)
    assert hash(c) == hash(LlamaConfig.from_dict(SMALL_LLAMA_TIED))


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LlamaConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlamaConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        LlamaConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA2_7B, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ValueError, match=r"config\.json.*GPT2LMHeadModel"):
        LlamaConfig.from_file(tmp_path / "config.json")


# ---------------------------------------------------------------------------------------------------------------
# checkpoint directories
def _one_line_error(fn, *needles):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


def test_checkpoint_directory_errors(tmp_path):
    _one_line_error(lambda: Checkpoint(tmp_path / "nope"), "nope", "does not exist")
    (tmp_path / "file").write_text("x")
    _one_line_error(lambda: Checkpoint(tmp_path / "file"), "not a directory")
    d = tmp_path / "ckpt"
    d.mkdir()
    _one_line_error(lambda: Checkpoint(d), "config.json")
    LlamaConfig.from_dict(SMALL_LLAMA_TIED).save(d / "config.json")
    _one_line_error(lambda: Checkpoint(d), "no weights", "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"")
    _one_line_error(lambda: Checkpoint(d), "pytorch_model.bin")


def test_missing_shard_and_corrupt_files(tmp_path):
    path = random_checkpoint(tmp_path / "sharded", LlamaConfig.from_dict(SMALL_LLAMA_TIED), shards=3)
    Checkpoint(path).check_complete()
    os.remove(os.path.join(path, "model-00002-of-00003.safetensors"))
    _one_line_error(lambda: Checkpoint(path), "model-00002-of-00003.safetensors", "missing")

    path = random_checkpoint(tmp_path / "single", LlamaConfig.from_dict(SMALL_LLAMA_TIED))
    weights = os.path.join(path, "model.safetensors")
    good = open(weights, "rb").read()
    for bad in (b"garbage", b"\xff" * 64, good[:len(good) // 2], good[:8] + b"[" + good[9:], good[:-4]):
        with open(weights, "wb") as f:
            f.write(bad)
        _one_line_error(lambda: Checkpoint(path), "model.safetensors", "not a valid safetensors")
    with open(weights, "wb") as f:
        f.write(good)
    assert Checkpoint(path).has("model.norm.weight")

    # an index that names a tensor its shard does not hold, and an index that is not JSON
    path = random_checkpoint(tmp_path / "index", LlamaConfig.from_dict(SMALL_LLAMA_TIED), shards=2)
    index = os.path.join(path, "model.safetensors.index.json")
    idx = json.load(open(index))
    idx["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    json.dump(idx, open(index, "w"))
    _one_line_error(lambda: Checkpoint(path), "model.layers.9.mlp.up_proj.weight")
    open(index, "w").write("{")
    _one_line_error(lambda: Checkpoint(path), "model.safetensors.index.json")


@pytest.fixture(scope="module")
def qwen2_ckpts(tmp_path_factory):
    """The same random Qwen2 weights (biases, tied head) in one file and in three shards."""
    cfg = LlamaConfig.from_dict(SMALL_QWEN2)
    root = tmp_path_factory.mktemp("qwen2")
    return (random_checkpoint(root / "one", cfg, seed=3), random_checkpoint(root / "three", cfg, seed=3, shards=3))


def test_sharded_layout(qwen2_ckpts):
    one, three = qwen2_ckpts
    files = sorted(f for f in os.listdir(three) if f.endswith(".safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    idx = json.load(open(os.path.join(three, "model.safetensors.index.json")))
    tensors = {}
    for f in files:
        tensors.update(load_file(os.path.join(three, f)))
    assert set(idx["weight_map"]) == set(tensors) == set(expected_tensors(Checkpoint(three).config))
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    single = load_file(os.path.join(one, "model.safetensors"))
    assert all(torch.equal(single[n], t) for n, t in tensors.items())  # same seed, same weights
    assert not os.path.exists(os.path.join(three, "model.safetensors"))


@pytest.mark.parametrize("layout", [0, 1])
def test_read_slices_equal_slicing_the_full_tensor(qwen2_ckpts, layout):
    ck = Checkpoint(qwen2_ckpts[layout])
    ck.check_complete()
    full = {}
    for f in os.listdir(ck.path):
        if f.endswith(".safetensors"):
            full.update(load_file(os.path.join(ck.path, f)))
    assert set(ck.names()) == set(full)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        t = full[name]
        assert ck.shape(name) == tuple(t.shape)
        assert torch.equal(ck.read(name), t)
        rows, cols = t.shape
        for a, b in ((0, rows // 2), (rows // 2, rows), (1, rows - 1), (3, 4)):
            assert torch.equal(ck.read(name, 0, a, b), t[a:b])
        for a, b in ((0, cols // 2), (cols // 2, cols), (5, 7)):
            got = ck.read(name, 1, a, b)
            assert torch.equal(got, t[:, a:b]) and got.is_contiguous()
        assert torch.equal(ck.read(name, 0, rows - 2), t[rows - 2:])
    bias = "model.layers.0.self_attn.v_proj.bias"
    assert torch.equal(ck.read(bias, 0, 8, 16), full[bias][8:16])
    got = ck.read(bias, 0, 0, 8, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, full[bias][:8].to(torch.bfloat16))
    assert ck.read(bias, device="cpu", dtype=torch.float64).dtype == torch.float64


def test_read_errors(qwen2_ckpts):
    ck = Checkpoint(qwen2_ckpts[1])
    name = "model.layers.0.mlp.up_proj.weight"  # [48, 32]
    for args in [(0, 5, 5), (0, 6, 2), (0, -1, 4), (0, 0, 49), (1, 0, 33), (2, 0, 1), (None, 1, None),
                 (None, 0, 4), (0, 48), (0, 1.0, 4), (True, 0, 4)]:
        with pytest.raises(ValueError, match="up_proj"):
            ck.read(name, *args)
    with pytest.raises(ValueError, match="cannot slice dim 1"):
        ck.read("model.norm.weight", 1, 0, 4)
    missing = "model.layers.3.mlp.up_proj.weight"
    msg = _one_line_error(lambda: ck.read(missing, 0, 0, 4), missing, ck.path, "partial checkpoint")
    assert msg == f"checkpoint {ck.path} has no tensor '{missing}' (partial checkpoint?)"
    with pytest.raises(ValueError, match="no tensor"):
        ck.shape(missing)
    assert not ck.has(missing) and ck.has(name) and not ck.has("lm_head.weight")


def test_slices_are_read_through_get_slice_and_owned(qwen2_ckpts, monkeypatch):
    """A sliced read never asks safetensors for the whole tensor, and what it returns is the caller's own."""
    log = []
    real = ckpt_mod.safe_open

    class SpySlice:
        def __init__(self, s, name):
            self.s, self.name = s, name

        def __getitem__(self, idx):
            out = self.s[idx]
            log.append(("slice", self.name, out.numel()))
            return out

        def get_shape(self):
            return self.s.get_shape()

    class SpyHandle:
        def __init__(self, *a, **k):
            self.h = real(*a, **k)

        def get_slice(self, name):
            return SpySlice(self.h.get_slice(name), name)

        def get_tensor(self, name):
            log.append(("tensor", name, None))
            return self.h.get_tensor(name)

    monkeypatch.setattr(ckpt_mod, "safe_open", SpyHandle)
    ck = Checkpoint(qwen2_ckpts[0])
    name = "model.embed_tokens.weight"  # [96, 32]
    assert log == []  # construction reads headers only
    a = ck.read(name, 0, 10, 20)
    b = ck.read(name, 1, 4, 8)
    assert log == [("slice", name, 10 * 32), ("slice", name, 96 * 4)]
    assert a.untyped_storage().nbytes() == 10 * 32 * 4 and b.untyped_storage().nbytes() == 96 * 4 * 4
    a.fill_(123.0)  # safetensors hands out views of its memory map: ours must be copies
    b.fill_(-1.0)
    again = ck.read(name)
    assert log[-1] == ("tensor", name, None)
    assert not (again == 123.0).any() and not (again == -1.0).any()


def _write(path, config: LlamaConfig, tensors):
    os.makedirs(path, exist_ok=True)
    config.save(os.path.join(path, "config.json"))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return Checkpoint(path)


def test_check_complete(tmp_path):
    cfg = LlamaConfig.from_dict(dict(SMALL, architectures=["LlamaForCausalLM"]))
    full = load_file(os.path.join(random_checkpoint(tmp_path / "full", cfg), "model.safetensors"))
    assert set(full) == set(expected_tensors(cfg)) and "lm_head.weight" in full
    _write(tmp_path / "ok", cfg, full).check_complete()

    partial = {k: v for k, v in full.items() if k != "model.layers.1.self_attn.v_proj.weight"}
    _one_line_error(_write(tmp_path / "partial", cfg, partial).check_complete,
                    "missing 1", "model.layers.1.self_attn.v_proj.weight")
    no_layer = {k: v for k, v in full.items() if not k.startswith("model.layers.1.")}
    msg = _one_line_error(_write(tmp_path / "nolayer", cfg, no_layer).check_complete, "missing 9", "more")
    assert "model.layers.1." in msg
    bad = dict(full, **{"model.layers.0.mlp.gate_proj.weight": torch.zeros(48, 31)})
    _one_line_error(_write(tmp_path / "shape", cfg, bad).check_complete,
                    "model.layers.0.mlp.gate_proj.weight", "[48, 31]", "[48, 32]")
    no_head = {k: v for k, v in full.items() if k != "lm_head.weight"}
    _one_line_error(_write(tmp_path / "nohead", cfg, no_head).check_complete, "lm_head.weight")
    _write(tmp_path / "tied", cfg.replace(tie_word_embeddings=True), no_head).check_complete()
    # a bias-carrying config wants the biases
    biased = cfg.replace(attention_bias=True, o_bias=True)
    _one_line_error(_write(tmp_path / "bias", biased, full).check_complete, "self_attn.q_proj.bias",
                    "self_attn.o_proj.bias")


def test_expected_tensors_shapes():
    cfg = LlamaConfig.from_dict(LLAMA31_8B_INSTRUCT)
    e = expected_tensors(cfg)
    assert len(e) == 1 + 32 * 9 + 2
    assert e["model.layers.31.self_attn.q_proj.weight"] == (4096, 4096)
    assert e["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    assert e["model.layers.0.self_attn.o_proj.weight"] == (4096, 4096)
    assert e["model.layers.0.mlp.down_proj.weight"] == (4096, 14336)
    assert e["lm_head.weight"] == (128256, 4096)
    q = expected_tensors(LlamaConfig.from_dict(QWEN2_05B))
    assert q["model.layers.0.self_attn.k_proj.bias"] == (128,) and "lm_head.weight" not in q
    assert "model.layers.0.self_attn.o_proj.bias" not in q and "model.layers.0.mlp.up_proj.bias" not in q
    assert sum(torch.Size(s).numel() for s in q.values()) == 494_032_768  # Qwen2-0.5B's parameter count


# ---------------------------------------------------------------------------------------------------------------
# tiny_checkpoint and random checkpoints, checked against transformers
def _hf_load_and_compare(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ck = Checkpoint(path)
    sd = model.state_dict()
    for name in expected_tensors(ck.config):
        assert torch.equal(sd[name].float(), ck.read(name).float()), name
    if ck.config.tie_word_embeddings:
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model, ck


def test_tiny_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTATTN_TINY_MODEL", str(tmp_path / "tiny"))
    path = tiny_checkpoint()
    assert path == str(tmp_path / "tiny")
    files = sorted(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    stamps = {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in files}
    inode = os.stat(path).st_ino
    assert tiny_checkpoint(path) == path  # second call: nothing rewritten
    assert {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in files} == stamps
    assert os.stat(path).st_ino == inode
    assert os.listdir(tmp_path) == ["tiny"]  # no temporary directories left behind

    ck = Checkpoint(path)
    ck.check_complete()
    assert ck.config == tiny_config()
    want = dict(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=128, intermediate_size=344,
                num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-6,
                rope_theta=10000.0, rope_scaling=None, max_position_embeddings=2048, tie_word_embeddings=False,
                attention_bias=False, o_bias=False, mlp_bias=False, hidden_act="silu", sliding_window=None,
                bos_token_id=1, eos_token_ids=(2,), torch_dtype="float32")
    assert fields(ck.config) == want
    assert LlamaConfig.from_dict(ck.config.to_dict()) == ck.config
    w = ck.read("model.layers.2.mlp.up_proj.weight")
    assert w.dtype == torch.float32 and 0.015 < w.std().item() < 0.025 and abs(w.mean().item()) < 0.002
    assert torch.equal(ck.read("model.norm.weight"), torch.ones(128))
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}

    model, _ = _hf_load_and_compare(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.head_dim == 16
    logits = model(torch.tensor([[1, 40, 50, 60]])).logits
    assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all()

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=ck.tokenizer_file, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == 1 and all(0 <= i < 512 for i in ids) and len(ids) < 8
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    auto = transformers.AutoTokenizer.from_pretrained(path)
    assert auto("Hello world")["input_ids"] == ids and (auto.bos_token_id, auto.eos_token_id) == (1, 2)
    text = "The quick brown fox, 42 times: naïve café ☕!"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text  # byte-level: any text

    # overwrite rebuilds (a new directory renamed into place), identically for the same seed
    weights = open(os.path.join(path, "model.safetensors"), "rb").read()
    assert tiny_checkpoint(path, overwrite=True) == path
    assert os.stat(path).st_ino != inode
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == weights
    assert os.listdir(tmp_path) == ["tiny"]


def test_tiny_checkpoint_replaces_a_partial_directory(tmp_path):
    path = tmp_path / "t"
    path.mkdir()
    (path / "config.json").write_text("{}")  # a half-made checkpoint: config, no weights
    assert tiny_checkpoint(str(path), seed=1) == str(path)
    Checkpoint(str(path)).check_complete()
    other = tiny_checkpoint(str(tmp_path / "u"), seed=2)
    assert not torch.equal(Checkpoint(str(path)).read("model.embed_tokens.weight"),
                           Checkpoint(other).read("model.embed_tokens.weight"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        tiny_checkpoint(str(tmp_path / "f"))


def test_tiny_checkpoint_creation_is_atomic(tmp_path, monkeypatch):
    import threading

    from fastattn_dist.models import tiny as tiny_mod

    path = str(tmp_path / "t")

    def broken(*a, **k):
        raise RuntimeError("killed while writing the tokenizer")

    monkeypatch.setattr(tiny_mod, "_write_tokenizer", broken)
    with pytest.raises(RuntimeError, match="killed"):
        tiny_checkpoint(path)
    assert os.listdir(tmp_path) == []  # nothing at path, no temporary directory left
    monkeypatch.undo()

    stale = tmp_path / ".t.tmp-dead"  # what a SIGKILLed creation leaves: removed once it is old
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    os.utime(stale, (0, 0))
    results, errors = [], []

    def make():
        try:
            results.append(tiny_checkpoint(path))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [path] * 4
    Checkpoint(path).check_complete()
    assert os.listdir(tmp_path) == ["t"]


def test_tokenizer_is_deterministic():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() <= 512 and max(a.get_vocab().values()) < 512
    assert [a.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    enc = a.encode("Hello world")
    assert enc.ids[0] == 1 and a.decode(enc.ids) == "Hello world"


@pytest.mark.parametrize("cfg", [SMALL_QWEN2, SMALL_LLAMA_TIED, SMALL_LLAMA_BIAS, SMALL_MISTRAL],
                         ids=["qwen2_tied_bias_window", "llama_tied", "llama_bias_headdim_linear", "mistral_window"])
def test_random_checkpoints_load_in_transformers(cfg, tmp_path):
    config = LlamaConfig.from_dict(cfg)
    path = random_checkpoint(tmp_path / "ck", config, seed=5, shards=2)
    model, ck = _hf_load_and_compare(path)
    assert ck.config == config.replace(torch_dtype="float32")
    assert fields(_from_hf(model.config)) == fields(ck.config)
    if config.attention_bias:
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        assert (model.model.layers[0].self_attn.o_proj.bias is not None) == config.o_bias
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, config.vocab_size) and torch.isfinite(out).all()


def test_random_checkpoint_bf16(tmp_path):
    cfg = LlamaConfig.from_dict(SMALL_LLAMA_TIED)
    ck = Checkpoint(random_checkpoint(tmp_path / "bf16", cfg, dtype=torch.bfloat16))
    assert ck.config.torch_dtype == "bfloat16" and ck.stored_dtype("model.norm.weight") == "BF16"
    f32 = Checkpoint(random_checkpoint(tmp_path / "f32", cfg))
    name = "model.layers.1.self_attn.o_proj.weight"
    assert ck.read(name).dtype == torch.bfloat16
    assert torch.equal(ck.read(name, 1, 8, 16, dtype=torch.float32), f32.read(name, 1, 8, 16).bfloat16().float())
    with pytest.raises(ValueError, match="shards"):
        random_checkpoint(tmp_path / "x", cfg, shards=0)
