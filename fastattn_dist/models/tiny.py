"""Small random checkpoints in the Hugging Face format, made locally (no download, no transformers).

``tiny_checkpoint()`` makes (once) a 4-layer GQA ``LlamaForCausalLM`` with a byte-level BPE tokenizer, for tests,
examples and smoke runs; ``random_checkpoint(path, config)`` writes random weights for any ``LlamaConfig``, in one
file or in ``shards`` files with the index transformers writes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Dict, Optional

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .checkpoint import CONFIG_NAME, INDEX_NAME, TOKENIZER_NAME, WEIGHTS_NAME, expected_tensors
from .config import LlamaConfig

ENV_TINY_MODEL = "FASTATTN_TINY_MODEL"
INIT_STD = 0.02

TINY_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=344,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=16, hidden_act="silu",
    rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False,
    attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2

# The tokenizer's training text (built in, so that the tokenizer is the same everywhere).
_CORPUS = """\
Hello world! This is a tiny language model made for testing a tensor-parallel attention runtime.
The model has random weights, so what it writes means nothing, but every layer is real: token embeddings,
rotary position embeddings, grouped-query attention with fewer key and value heads than query heads,
RMS normalization, a gated SiLU feed-forward network, and an output head over the whole vocabulary.
Each rank of a tensor-parallel group reads only its own slice of every weight: the query, key and value
projections are split by heads, the output projection by its input columns, the gate and up projections
by rows, and the down projection by columns. After attention and after the feed-forward network the ranks
add their partial results together with an all-reduce, and the fast path hides that all-reduce behind the
attention computation of the next tile.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
Once upon a time there was a small model that wanted to be large. It read every book in the library,
one token at a time, and it learned that the most common words in English are the, of, and, to, in, is,
that, it, was, for, on, are, as, with, his, they, at, be, this, have, from, or, one, had, by, word, but,
not, what, all, were, we, when, your, can, said, there, use, an, each, which, she, do, how, their, if,
will, up, other, about, out, many, then, them, these, so, some, her, would, make, like, him, into, time,
has, look, two, more, write, go, see, number, no, way, could, people, my, than, first, water, been, call,
who, oil, its, now, find, long, down, day, did, get, come, made, may, part.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192.
Questions and answers: What is the capital of France? Paris. How many legs does a spider have? Eight.
Why is the sky blue? Because air scatters blue light more than red light. Where do penguins live? In the
southern hemisphere. Who wrote Hamlet? William Shakespeare. When did the first person walk on the Moon? 1969.
def hello(name):
    return "Hello, " + name + "!"
print(hello("world"))
"""


def _default_path() -> str:
    return os.environ.get(ENV_TINY_MODEL) or os.path.join(os.path.expanduser("~"), ".cache", "fastattn_dist",
                                                          "tiny-llama")


def tiny_config() -> LlamaConfig:
    """The configuration of ``tiny_checkpoint()``."""
    return LlamaConfig.from_dict(TINY_CONFIG)


def _has_weights(path: str) -> bool:
    return os.path.isfile(os.path.join(path, WEIGHTS_NAME)) or os.path.isfile(os.path.join(path, INDEX_NAME))


def _random_tensors(config: LlamaConfig, names, gen: torch.Generator, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    shapes = expected_tensors(config)
    out = {}
    for name in names:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float32)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD
        out[name] = t.to(dtype).contiguous()
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def random_checkpoint(path: "str | os.PathLike", config: LlamaConfig, *, seed: int = 0,
                      dtype: torch.dtype = torch.float32, shards: int = 1) -> str:
    """Write a random checkpoint of ``config`` into directory ``path`` (created if needed); returns the path.

    Weights and biases ~ N(0, 0.02), norm weights 1, in ``dtype`` (written as the config's ``torch_dtype``).
    ``shards`` > 1 writes ``model-0000i-of-0000n.safetensors`` files, tensors split in order into parts of about
    equal size, and ``model.safetensors.index.json`` as transformers writes it. The same seed gives the same
    weights whatever the sharding.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = config.replace(torch_dtype=_dtype_name(dtype))
    config.save(os.path.join(path, CONFIG_NAME))
    shapes = expected_tensors(config)
    names = list(shapes)
    if shards > len(names):
        raise ValueError(f"shards ({shards}) must not exceed the number of tensors ({len(names)})")
    gen = torch.Generator().manual_seed(seed)
    if shards == 1:
        save_file(_random_tensors(config, names, gen, dtype), os.path.join(path, WEIGHTS_NAME),
                  metadata={"format": "pt"})
        return path
    # split the ordered names into `shards` contiguous groups of about equal element count
    sizes = [int(torch.Size(shapes[n]).numel()) for n in names]
    total, groups, acc, cur = sum(sizes), [], 0, []
    for i, (n, s) in enumerate(zip(names, sizes)):
        cur.append(n)
        acc += s
        left_groups = shards - len(groups) - 1
        left_names = len(names) - i - 1
        if left_groups > 0 and (acc >= total * (len(groups) + 1) / shards or left_names == left_groups):
            groups.append(cur)
            cur = []
    groups.append(cur)
    assert len(groups) == shards and all(groups)
    weight_map, nbytes = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        tensors = _random_tensors(config, group, gen, dtype)
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            nbytes += t.numel() * t.element_size()
    with open(os.path.join(path, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    return path


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained in-process on a built-in English text (deterministic).

    Special tokens "<unk>" (0), "<s>" (1, added in front of every encoding, as Llama does), "</s>" (2).
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [0, 1, 2] or tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tokenizer training gave special ids {ids} and {tok.get_vocab_size()} tokens")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def _write_tokenizer(path: str, config: LlamaConfig) -> None:
    build_tokenizer(config.vocab_size).save(os.path.join(path, TOKENIZER_NAME))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2)
        f.write("\n")
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)
        f.write("\n")


def tiny_checkpoint(path: Optional[str] = None, *, seed: int = 0, overwrite: bool = False) -> str:
    """The directory of a tiny random ``LlamaForCausalLM`` checkpoint, made there first if it is not yet.

    ``path``: default ``$FASTATTN_TINY_MODEL``, else ``~/.cache/fastattn_dist/tiny-llama``. When ``path`` already
    holds ``config.json`` and weights it is returned untouched (unless ``overwrite``). The checkpoint is built in
    a temporary directory beside ``path`` and renamed into place, so a killed or concurrent creation never leaves
    a partial checkpoint at ``path``.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path) if path is not None else _default_path()))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"tiny checkpoint path {path} exists and is not a directory")
    if not overwrite and os.path.isfile(os.path.join(path, CONFIG_NAME)) and _has_weights(path):
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent, os.path.basename(path))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        config = tiny_config()
        random_checkpoint(tmp, config, seed=seed, dtype=torch.float32)
        _write_tokenizer(tmp, config)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _install(tmp, path, overwrite)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _remove_stale(parent: str, base: str, age_s: float = 3600.0) -> None:
    """Remove what killed creations left beside the checkpoint (temporary directories older than ``age_s``)."""
    now = time.time()
    for entry in os.listdir(parent):
        if entry.startswith((f".{base}.tmp-", f".{base}.old-")):
            full = os.path.join(parent, entry)
            try:
                if now - os.stat(full).st_mtime > age_s:
                    shutil.rmtree(full, ignore_errors=True)
            except OSError:
                pass


def _install(tmp: str, path: str, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``path``; an old directory at ``path`` is moved aside first, then removed."""
    old = None
    if os.path.exists(path):
        if not overwrite and os.path.isfile(os.path.join(path, CONFIG_NAME)) and _has_weights(path):
            return  # a concurrent creation finished first
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
        old = os.path.join(old, "ckpt")
        try:
            os.rename(path, old)
        except FileNotFoundError:
            pass  # someone else moved it away meanwhile
    try:
        os.rename(tmp, path)
    except OSError:
        # a concurrent creation installed its copy between our check and rename: theirs is complete, keep it
        if not (os.path.isfile(os.path.join(path, CONFIG_NAME)) and _has_weights(path)):
            raise
    if old is not None:
        shutil.rmtree(os.path.dirname(old), ignore_errors=True)
