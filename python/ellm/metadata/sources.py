"""Tensor headers (name, shape, dtype, bytes as stored) from every source metadata accepts,
without reading any weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelFormatError


@dataclass
class TensorHeader:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


_NUMPY_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _dtype_name(value: Any) -> str:
    text = str(getattr(value, "dtype", np.asarray(value).dtype)).replace("torch.", "")
    return _NUMPY_NAMES.get(text, text.upper())


def from_state_dict(state: dict) -> list[TensorHeader]:
    headers = []
    for name, value in state.items():
        shape = tuple(int(d) for d in getattr(value, "shape", np.shape(value)))
        count = int(np.prod(shape, dtype=np.int64))
        itemsize = getattr(getattr(value, "dtype", None), "itemsize", None) or getattr(value, "element_size", lambda: 4)()
        headers.append(TensorHeader(name, shape, _dtype_name(value), int(count * itemsize)))
    return headers


def from_gguf(path: str) -> list[TensorHeader]:
    """Tensor headers under the names GGUF stores, read by the loader's header reader (the Rust
    one where the extension is built), which checks every count, length and size against the
    file's size before using it."""
    from ..weights.gguf import tensor_headers

    return [TensorHeader(name, shape, kind, nbytes) for name, shape, kind, nbytes in tensor_headers(path)]


def from_path(path: str | os.PathLike):
    """(headers, ModelArgs or None, format) for a folder, .safetensors file or .gguf file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}")
    if path.endswith(".gguf"):
        return from_gguf(path), None, "gguf"
    if os.path.isdir(path) or path.endswith(".safetensors"):
        from ..weights.safetensors import open_safetensors

        ckpt = open_safetensors(path)
        headers = [TensorHeader(n, t.shape, t.dtype, t.nbytes) for n, t in ckpt.tensors.items()]
        return headers, ckpt.args, "safetensors"
    raise ModelFormatError(f"{path} is not a model ellm reads: expected a Hugging Face folder, a .safetensors "
                           "file or a .gguf file")
