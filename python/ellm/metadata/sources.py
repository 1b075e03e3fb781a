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


# GGUF value types: fixed sizes, 8 = string, 9 = array (see the GGUF specification)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def from_gguf(path: str) -> list[TensorHeader]:
    """Tensor headers under the names GGUF stores, parsed from the file header alone (the
    key/value section is skipped over, not decoded, so a large vocabulary costs nothing)."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        def read(n: int) -> bytes:
            data = fh.read(n)
            if len(data) < n:
                raise ModelFormatError(f"{path} is truncated inside its GGUF header")
            return data

        def u32() -> int:
            return struct.unpack("<I", read(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", read(8))[0]

        def skip_value(kind: int) -> None:
            if kind == 8:
                fh.seek(u64(), 1)
            elif kind == 9:
                item, count = u32(), u64()
                if item == 8:
                    for _ in range(count):
                        fh.seek(u64(), 1)
                elif item in _GGUF_SIZES:
                    fh.seek(_GGUF_SIZES[item] * count, 1)
                else:
                    raise ModelFormatError(f"{path}: unsupported GGUF array type {item}")
            elif kind in _GGUF_SIZES:
                fh.seek(_GGUF_SIZES[kind], 1)
            else:
                raise ModelFormatError(f"{path}: unsupported GGUF value type {kind}")

        if read(4) != b"GGUF":
            raise ModelFormatError(f"{path} is not a GGUF file (bad magic)")
        version, n_tensors, n_kv = u32(), u64(), u64()
        if version < 2:
            raise ModelFormatError(f"{path}: GGUF version {version} is not supported")
        for _ in range(n_kv):
            fh.seek(u64(), 1)
            skip_value(u32())
            if fh.tell() > size:
                raise ModelFormatError(f"{path} is truncated inside its GGUF metadata")
        headers = []
        for _ in range(n_tensors):
            name = read(u64()).decode("utf-8")
            dims = [u64() for _ in range(u32())]
            try:
                kind = GGMLQuantizationType(u32())
            except ValueError as exc:
                raise ModelFormatError(f"{path}: tensor {name}: {exc}") from None
            u64()  # data offset
            block, type_size = GGML_QUANT_SIZES[kind]
            count = 1
            for d in dims:
                count *= d
            headers.append(TensorHeader(name, tuple(reversed(dims)), kind.name, count // block * type_size))
    return headers


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
