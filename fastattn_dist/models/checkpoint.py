"""A Hugging Face checkpoint directory (``config.json`` + safetensors weights) read slice by slice.

Each tensor-parallel rank opens the same directory and reads only its own rows or columns of each weight:
``Checkpoint.read(name, dim, start, end)`` goes through ``safe_open(...).get_slice(name)``, so only the bytes
of the slice are read from the (memory-mapped) file. At construction only ``config.json`` and the small JSON
headers of the weight files are read (that is where names, dtypes and shapes live); the files are opened with
``safetensors.safe_open`` on first read.

Layout (the one ``save_pretrained`` writes): ``model.safetensors``, or ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {tensor name: shard file}}``) and its shard files.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from .config import LlamaConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"

# bytes per element of the safetensors dtypes (sub-byte types are checked by safetensors itself)
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def expected_tensors(config: LlamaConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``config`` holds, name -> shape, in model order.

    ``lm_head.weight`` is left out when the embeddings are tied.
    """
    c = config
    h, q, kv, inter = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
    out: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[f"{p}self_attn.{proj}.weight"] = (rows, h)
            if c.attention_bias:
                out[f"{p}self_attn.{proj}.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if c.o_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            out[f"{p}mlp.{proj}.weight"] = shape
            if c.mlp_bias:
                out[f"{p}mlp.{proj}.bias"] = (shape[0],)
    out["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, h)
    return out


def read_safetensors_header(path: str) -> Dict[str, dict]:
    """The tensor entries (name -> {"dtype", "shape", "data_offsets"}) of a safetensors file's header.

    Reads only the header; ValueError (one line) when the file is not valid safetensors.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            raw = f.read(n)
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_size = size - 8 - n
        entries = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(e, dict) or not isinstance(e.get("dtype"), str):
                raise ValueError(f"bad header entry for {name!r}")
            shape, offs = e.get("shape"), e.get("data_offsets")
            if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                    or not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) for o in offs) or not 0 <= offs[0] <= offs[1] <= data_size):
                raise ValueError(f"bad shape or data offsets for {name!r}")
            numel = 1
            for s in shape:
                numel *= s
            item = _ITEMSIZE.get(e["dtype"])
            if item is not None and numel * item != offs[1] - offs[0]:
                raise ValueError(f"tensor {name!r}: {e['dtype']} {shape} needs {numel * item} bytes, "
                                 f"the header gives {offs[1] - offs[0]}")
            entries[name] = e
        return entries
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"weight file {path} is not a valid safetensors file ({_one_line(e)})") from None


class Checkpoint:
    """A Hugging Face checkpoint directory of a Llama-family model; see the module docstring."""

    def __init__(self, path: "str | os.PathLike") -> None:
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint {path} is not a directory" if os.path.exists(path)
                             else f"checkpoint {path} does not exist")
        self.path: str = path
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise ValueError(f"checkpoint {path} has no {CONFIG_NAME}")
        self.config: LlamaConfig = LlamaConfig.from_file(os.path.join(path, CONFIG_NAME))
        self._files: Dict[str, str] = {}             # tensor name -> file name (relative to path)
        self._headers: Dict[str, Dict[str, dict]] = {}  # file name -> its header entries
        self._handles: Dict[str, object] = {}         # file name -> open safe_open handle
        single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
        if os.path.isfile(single):  # transformers looks for the single file first, too
            self._headers[WEIGHTS_NAME] = read_safetensors_header(single)
            self._files = {name: WEIGHTS_NAME for name in self._headers[WEIGHTS_NAME]}
        elif os.path.isfile(index):
            self._load_index(index)
        else:
            others = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                      if os.path.exists(os.path.join(path, f))]
            hint = f" (found {', '.join(others)}: only safetensors weights are read)" if others else ""
            raise ValueError(f"checkpoint {path} has no weights: neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}")

    def _load_index(self, index: str) -> None:
        try:
            with open(index, "r", encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not an object of file names")
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"weight index {index} is not a valid index ({_one_line(e)})") from None
        for shard in sorted(set(weight_map.values())):
            full = os.path.join(self.path, shard)
            if os.path.basename(shard) != shard or not os.path.isfile(full):
                raise ValueError(f"weight index {index} names shard {shard!r}, which is missing from {self.path}")
            self._headers[shard] = read_safetensors_header(full)
        for name, shard in weight_map.items():
            if name not in self._headers[shard]:
                raise ValueError(f"weight index {index} puts tensor {name!r} in {shard}, which has no such tensor")
        self._files = dict(weight_map)

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, {self.config.architecture}, {len(self._files)} tensors)"

    # ------------------------------------------------------------------ queries
    def names(self) -> List[str]:
        """All tensor names of the checkpoint."""
        return list(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def _entry(self, name: str) -> dict:
        f = self._files.get(name)
        if f is None:
            raise ValueError(f"checkpoint {self.path} has no tensor {name!r} (partial checkpoint?)")
        return self._headers[f][name]

    def shape(self, name: str) -> Tuple[int, ...]:
        """The tensor's shape, from the file's header (no data is read)."""
        return tuple(self._entry(name)["shape"])

    def stored_dtype(self, name: str) -> str:
        """The tensor's safetensors dtype name ("BF16", "F32", ...), from the header."""
        return self._entry(name)["dtype"]

    @property
    def tokenizer_file(self) -> Optional[str]:
        """Path of ``tokenizer.json`` in the checkpoint directory, or None."""
        p = os.path.join(self.path, TOKENIZER_NAME)
        return p if os.path.isfile(p) else None

    # ------------------------------------------------------------------ reading
    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            full = os.path.join(self.path, file)
            try:
                h = safe_open(full, framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"weight file {full} is not a valid safetensors file ({_one_line(e)})") from None
            self._handles[file] = h
        return h

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, end: Optional[int] = None, *,
             dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
        """Tensor ``name``, whole (``dim=None``) or only rows ``[start, end)`` along ``dim`` 0 or 1.

        Only the slice's bytes are read. ``dtype`` / ``device`` convert the result (default: as stored, CPU). The
        result is a contiguous tensor of its own (never a view of the file's memory map).
        """
        shape = self.shape(name)
        file = self._files[name]
        if dim is None:
            if start != 0 or end is not None:
                raise ValueError(f"reading {name!r}: start/end given without dim")
            t = self._handle(file).get_tensor(name)
        else:
            if dim not in (0, 1) or isinstance(dim, bool):
                raise ValueError(f"reading {name!r}: dim must be None, 0 or 1, got {dim!r}")
            if dim >= len(shape):
                raise ValueError(f"reading {name!r}: cannot slice dim {dim} of a tensor of shape {shape}")
            size = shape[dim]
            if end is None:
                end = size
            if (not isinstance(start, int) or isinstance(start, bool) or not isinstance(end, int)
                    or isinstance(end, bool) or not 0 <= start < end <= size):
                raise ValueError(f"reading {name!r}: bad slice [{start!r}, {end!r}) of dim {dim} (size {size}); "
                                 f"need 0 <= start < end <= {size}")
            sl = self._handle(file).get_slice(name)
            t = sl[start:end] if dim == 0 else sl[:, start:end]
        # safetensors (0.6+) hands out views into its shared memory map: copy, so that only the slice's pages are
        # read and the caller owns its tensor (writing to a view would change what later reads of the file see)
        return t.to(device=device if device is not None else t.device, dtype=dtype if dtype is not None else t.dtype,
                    copy=True, memory_format=torch.contiguous_format)

    # ------------------------------------------------------------------ validation
    def check_complete(self) -> None:
        """ValueError (one line, the first few problems) unless every tensor the config implies is present with
        the expected shape. ``lm_head.weight`` is not required with tied embeddings."""
        missing, wrong = [], []
        for name, shape in expected_tensors(self.config).items():
            if name not in self._files:
                missing.append(name)
            elif self.shape(name) != shape:
                wrong.append(f"{name!r} is {list(self.shape(name))}, expected {list(shape)}")
        if not missing and not wrong:
            return
        parts = []
        if missing:
            more = f", ... ({len(missing) - 5} more)" if len(missing) > 5 else ""
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(map(repr, missing[:5]))}{more}")
        if wrong:
            more = f", ... ({len(wrong) - 5} more)" if len(wrong) > 5 else ""
            parts.append(f"{len(wrong)} with the wrong shape: {', '.join(wrong[:5])}{more}")
        raise ValueError(f"checkpoint {self.path} does not match its {self.config.architecture} config: "
                         + "; ".join(parts))
