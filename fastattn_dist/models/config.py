"""The configuration of a Llama-family checkpoint (Llama 2/3, Mistral, Qwen2), read from a Hugging Face ``config.json``.

``LlamaConfig.from_dict`` follows the semantics of transformers' ``LlamaConfig``, ``MistralConfig`` and
``Qwen2Config`` (defaults included) for the fields a decoder of this family needs, and reads both the
transformers 4.x form of the RoPE settings (top-level ``rope_theta`` and ``rope_scaling``) and the 5.x form
(``rope_parameters`` holding ``rope_theta`` and ``rope_type``). ``to_dict`` writes a ``config.json`` that both
this class and transformers (>= 4.45) read back to the same model. transformers itself is never imported.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..rope import check_scaling

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# model_type (the fallback when "architectures" is missing or null) -> architecture, and back
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_MODEL_TYPE_OF = {arch: mt for mt, arch in MODEL_TYPES.items()}

# transformers' defaults (5.x; the same in 4.45 except where noted) for keys a config.json may leave out
_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "LlamaForCausalLM": dict(max_position_embeddings=2048, num_key_value_heads=None, bos_token_id=1,
                             eos_token_id=2, sliding_window=None),
    "MistralForCausalLM": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, bos_token_id=1,
                               eos_token_id=2, sliding_window=4096),
    "Qwen2ForCausalLM": dict(max_position_embeddings=32768, num_key_value_heads=32, bos_token_id=None,
                             eos_token_id=None, sliding_window=4096, max_window_layers=28),
}
_DEFAULT_THETA = 10000.0
_DEFAULT_EPS = 1e-6
# Dimensions without a meaningful default: a config.json that lacks one is rejected rather than silently
# given transformers' 7B-sized default.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class LlamaConfig:
    """What a Llama-family decoder needs from ``config.json``; build it with ``from_dict`` / ``from_file``.

    Construction validates the fields, including that they are expressible as the given architecture's
    Hugging Face config (e.g. Qwen2 has q/k/v biases and no o_proj bias; Llama has one ``attention_bias``
    for q/k/v/o), so ``to_dict`` always round-trips.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int                  # config "head_dim" if present (and not null), else hidden_size // num_attention_heads
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict] = field(hash=False)  # None, or a dict check_scaling accepts (rope_type set, no rope_theta)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False   # q/k/v projections have a bias
    o_bias: bool = False           # o_proj has a bias
    mlp_bias: bool = False         # gate/up/down projections have a bias (Llama only)
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None  # attention to the last `sliding_window` keys (Mistral, Qwen2), or None
    bos_token_id: Optional[int] = None
    eos_token_ids: Tuple[int, ...] = ()
    torch_dtype: Optional[str] = None     # the checkpoint's stored dtype as named in config.json ("bfloat16", ...)

    def __post_init__(self) -> None:
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"{arch} config: {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{arch} config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"{arch} config: rotary embeddings need an even head_dim, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not _is_number(v) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{arch} config: {name} must be a finite number > 0, got {v!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"{arch} config: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        try:
            scaling = check_scaling(self.rope_scaling)
        except TypeError as e:
            raise ValueError(f"{arch} config: {e}") from None
        if scaling is not None:
            scaling.pop("type", None)
            scaling.pop("rope_theta", None)
        object.__setattr__(self, "rope_scaling", scaling)
        for name in ("tie_word_embeddings", "attention_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{arch} config: {name} must be a bool, got {getattr(self, name)!r}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window <= 0):
            raise ValueError(f"{arch} config: sliding_window must be a positive integer or None, "
                             f"got {self.sliding_window!r}")
        if self.bos_token_id is not None and not _is_int(self.bos_token_id):
            raise ValueError(f"{arch} config: bos_token_id must be an integer or None, got {self.bos_token_id!r}")
        eos = tuple(self.eos_token_ids)
        if not all(_is_int(t) for t in eos):
            raise ValueError(f"{arch} config: eos token ids must be integers, got {list(eos)!r}")
        object.__setattr__(self, "eos_token_ids", eos)
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ValueError(f"{arch} config: torch_dtype must be a string or None, got {self.torch_dtype!r}")
        # what the Hugging Face classes of each architecture can express
        if arch == "Qwen2ForCausalLM":
            if (self.attention_bias, self.o_bias, self.mlp_bias) != (True, False, False):
                raise ValueError("Qwen2ForCausalLM has biases on q/k/v only: attention_bias=True, o_bias=False, "
                                 "mlp_bias=False")
        elif arch == "MistralForCausalLM":
            if self.attention_bias or self.o_bias or self.mlp_bias:
                raise ValueError("MistralForCausalLM has no biases: attention_bias, o_bias and mlp_bias must be False")
        else:
            if self.o_bias != self.attention_bias:
                raise ValueError("LlamaForCausalLM's attention_bias covers q/k/v and o_proj alike: o_bias must "
                                 "equal attention_bias")
            if self.sliding_window is not None:
                raise ValueError("LlamaForCausalLM has no sliding window attention: sliding_window must be None")

    # ------------------------------------------------------------------ derived sizes
    @property
    def model_type(self) -> str:
        return _MODEL_TYPE_OF[self.architecture]

    @property
    def q_size(self) -> int:
        """Rows of q_proj: num_attention_heads * head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Rows of k_proj and v_proj: num_key_value_heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Parse a Hugging Face config dict (as in ``config.json``); ValueError naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object, got {type(d).__name__}")
        arch = _architecture(d)
        defaults = _DEFAULTS[arch]
        for key in _REQUIRED:
            if d.get(key) is None:
                raise ValueError(f"{arch} config has no {key!r}")
        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        kv = d.get("num_key_value_heads", defaults["num_key_value_heads"])
        if kv is None:
            kv = heads
        head_dim = d.get("head_dim")
        if head_dim is None:
            if not _is_int(hidden) or not _is_int(heads) or heads <= 0:
                raise ValueError(f"{arch} config: hidden_size and num_attention_heads must be positive integers, "
                                 f"got {hidden!r} and {heads!r}")
            head_dim = hidden // heads
        theta, scaling = _rope(d, arch)
        if arch == "Qwen2ForCausalLM":
            attention_bias, o_bias, mlp_bias = True, False, False
        elif arch == "MistralForCausalLM":
            attention_bias = o_bias = mlp_bias = False  # MistralAttention / MistralMLP never have biases
        else:
            attention_bias = o_bias = _flag(d, "attention_bias", arch)
            mlp_bias = _flag(d, "mlp_bias", arch)
        eos = d.get("eos_token_id", defaults["eos_token_id"])
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        dtype = d.get("torch_dtype", d.get("dtype"))  # transformers 5.x writes "dtype"
        if isinstance(dtype, str):
            dtype = dtype[len("torch."):] if dtype.startswith("torch.") else dtype
            dtype = None if dtype == "auto" else dtype
        hidden_act = d.get("hidden_act", "silu")
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=d["rms_norm_eps"] if d.get("rms_norm_eps") is not None else _DEFAULT_EPS,
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", defaults["max_position_embeddings"]),
            tie_word_embeddings=_flag(d, "tie_word_embeddings", arch),
            attention_bias=attention_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            hidden_act="silu" if hidden_act == "swish" else hidden_act,  # the same function in transformers
            sliding_window=_sliding_window(d, arch),
            bos_token_id=d.get("bos_token_id", defaults["bos_token_id"]),
            eos_token_ids=eos_ids,
            torch_dtype=dtype,
        )

    @classmethod
    def from_file(cls, path: "str | os.PathLike") -> "LlamaConfig":
        """Parse a ``config.json`` file; ValueError if it is missing, unreadable or not JSON."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"model config {path} does not exist" if not os.path.exists(path)
                             else f"model config {path} is not a file")
        try:
            with open(path, "r", encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {path} is not valid JSON ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"model config {path} cannot be read ({_one_line(e)})") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"model config {path}: {e}") from None

    def to_dict(self) -> dict:
        """A Hugging Face style ``config.json`` dict that ``from_dict`` and transformers (>= 4.45) read back.

        RoPE settings are written in both forms: ``rope_theta`` / ``rope_scaling`` (what transformers 4.x reads)
        and ``rope_parameters`` (what 5.x writes; 5.x reads either).
        """
        rope_parameters = dict(self.rope_scaling or {"rope_type": "default"}, rope_theta=self.rope_theta)
        d: Dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling is not None else None,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (None if not self.eos_token_ids else self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                             else list(self.eos_token_ids)),
            "torch_dtype": self.torch_dtype,
        }
        if self.architecture == "LlamaForCausalLM":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        elif self.architecture == "MistralForCausalLM":
            d["sliding_window"] = self.sliding_window  # always written: a missing key means 4096
        else:
            sliding = self.sliding_window is not None
            d["use_sliding_window"] = sliding
            d["sliding_window"] = self.sliding_window
            # every layer slides (max_window_layers=0) or none does; layer_types says the same for 5.x
            d["max_window_layers"] = 0 if sliding else self.num_hidden_layers
            d["layer_types"] = [("sliding_attention" if sliding else "full_attention")] * self.num_hidden_layers
        return d

    def save(self, path: "str | os.PathLike") -> None:
        """Write ``to_dict()`` as JSON to ``path`` (a config.json)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


# ---------------------------------------------------------------------- helpers of from_dict
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _architecture(d: dict) -> str:
    archs = d.get("architectures")
    if archs is not None:
        if isinstance(archs, str):
            archs = [archs]
        if not isinstance(archs, (list, tuple)) or not archs:
            raise ValueError(f"config 'architectures' must be a non-empty list, got {archs!r}")
        for a in archs:
            if a in SUPPORTED_ARCHITECTURES:
                return a
        raise ValueError(f"unsupported architecture {', '.join(map(repr, archs))}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    mt = d.get("model_type")
    if mt in MODEL_TYPES:
        return MODEL_TYPES[mt]
    if mt is None:
        raise ValueError("config has neither 'architectures' nor 'model_type'; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    raise ValueError(f"unsupported model_type {mt!r} (no 'architectures' given); supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(MODEL_TYPES)})")


def _flag(d: dict, key: str, arch: str) -> bool:
    v = d.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ValueError(f"{arch} config: {key} must be true or false, got {v!r}")
    return v


def _rope(d: dict, arch: str) -> Tuple[Any, Optional[dict]]:
    """(rope_theta, rope_scaling) from either the 4.x keys or the 5.x ``rope_parameters``.

    As in transformers 5.x: a non-empty ``rope_scaling`` wins over ``rope_parameters``; ``rope_theta`` comes from
    that dict, else the top-level key, else 10000.
    """
    scaling = d.get("rope_scaling")
    params = d.get("rope_parameters")
    for name, v in (("rope_scaling", scaling), ("rope_parameters", params)):
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"{arch} config: {name} must be an object or null, got {v!r}")
    rope = dict(scaling or params or {})
    if rope and all(isinstance(v, dict) for v in rope.values()):
        # rope_parameters nested by layer type ({"full_attention": {...}, ...}): fine when all agree
        inner = list(rope.values())
        if any(x != inner[0] for x in inner[1:]):
            raise ValueError(f"{arch} config: per-layer-type RoPE parameters are not supported "
                             f"({', '.join(rope)})")
        rope = dict(inner[0])
    theta = rope.pop("rope_theta", None)
    if theta is None:
        theta = d.get("rope_theta")
    if theta is None:
        theta = _DEFAULT_THETA
    kind = rope.get("rope_type", rope.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind in ("llama3", "yarn", "longrope"):
        # transformers fills in the pretraining length from max_position_embeddings when absent
        rope.setdefault("original_max_position_embeddings",
                        d.get("max_position_embeddings", _DEFAULTS[arch]["max_position_embeddings"]))
    rope["rope_type"] = kind
    rope.pop("type", None)
    try:
        check_scaling(rope)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{arch} config: {e}") from None
    return theta, rope


def _sliding_window(d: dict, arch: str) -> Optional[int]:
    if arch == "LlamaForCausalLM":
        return None
    defaults = _DEFAULTS[arch]
    if arch == "MistralForCausalLM":
        return d.get("sliding_window", defaults["sliding_window"])  # present but null: no window
    # Qwen2: the window only counts with use_sliding_window, and then only on the layers that layer_types (or,
    # without it, max_window_layers) mark as sliding
    if not d.get("use_sliding_window", False):
        return None
    window = d.get("sliding_window", defaults["sliding_window"])
    if window is None:
        return None
    n = d["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", defaults["max_window_layers"])
        if not _is_int(first):
            raise ValueError(f"{arch} config: max_window_layers must be an integer, got {first!r}")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n:
        raise ValueError(f"{arch} config: layer_types must list one type per layer ({n}), got {types!r}")
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding == 0:
        return None
    if sliding != n:
        raise ValueError(f"{arch} config: sliding window attention on {sliding} of {n} layers only is not supported "
                         "(all layers or none)")
    return window
