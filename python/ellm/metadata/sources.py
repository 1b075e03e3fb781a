"""Tensor headers (name, shape, dtype, bytes as stored) from every source metadata accepts,
without reading any weights."""

from __future__ import annotations

import os
import struct
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
    """Tensor headers under the names GGUF stores, from the Rust reader where the extension is
    built; otherwise parsed here from the file header alone (the key/value section is skipped
    over, not decoded, so a large vocabulary costs nothing). Either way every count, length and
    size is checked against the file's size before it is used."""
    from .._backend import rust_available

    if rust_available():
        from .. import _lowlevel

        return [TensorHeader(name, tuple(shape), kind, nbytes)
                for name, shape, kind, nbytes in _lowlevel.GgufReader(path).tensors()]
    try:
        return _gguf_headers(path)
    except ModelFormatError:
        raise
    except (struct.error, OverflowError, OSError, MemoryError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


_MAX_DIMS = 4  # GGML_MAX_DIMS


def _gguf_headers(path: str) -> list[TensorHeader]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        def read(n: int, what: str) -> bytes:
            if n > size - fh.tell():
                raise ModelFormatError(f"{path}: {what} of {n} bytes runs past the end of the file (truncated?)")
            return fh.read(n)

        def u32(what: str) -> int:
            return struct.unpack("<I", read(4, what))[0]

        def u64(what: str) -> int:
            return struct.unpack("<Q", read(8, what))[0]

        def skip(n: int, what: str) -> None:
            if n > size - fh.tell():
                raise ModelFormatError(f"{path}: {what} of {n} bytes runs past the end of the file")
            fh.seek(n, 1)

        def skip_value(kind: int, key: str) -> None:
            if kind == 8:
                skip(u64(f"the length of {key}"), f"the string {key}")
            elif kind == 9:
                item, count = u32(f"the item type of {key}"), u64(f"the length of {key}")
                if item == 8:
                    if count > (size - fh.tell()) // 8:
                        raise ModelFormatError(f"{path}: array {key} declares {count} strings, more than the file holds")
                    for _ in range(count):
                        skip(u64(f"a string length in {key}"), f"a string in {key}")
                elif item in _GGUF_SIZES:
                    skip(_GGUF_SIZES[item] * count, f"the array {key}")
                else:
                    raise ModelFormatError(f"{path}: {key}: unsupported GGUF array type {item}")
            elif kind in _GGUF_SIZES:
                skip(_GGUF_SIZES[kind], key)
            else:
                raise ModelFormatError(f"{path}: {key}: unsupported GGUF value type {kind}")

        if read(4, "the magic") != b"GGUF":
            raise ModelFormatError(f"{path} is not a GGUF file (bad magic)")
        version, n_tensors, n_kv = u32("the version"), u64("the tensor count"), u64("the key/value count")
        if version < 2:
            raise ModelFormatError(f"{path}: GGUF version {version} is not supported")
        # every key/value takes at least 12 bytes and every tensor entry at least 24
        if n_kv > size // 12 or n_tensors > size // 24:
            raise ModelFormatError(f"{path}: the header declares {n_tensors} tensors and {n_kv} keys, more than a "
                                   f"{size}-byte file can hold (truncated or corrupt)")
        for i in range(n_kv):
            key = read(u64(f"the length of key {i}"), f"key {i}").decode("utf-8", errors="replace")
            skip_value(u32(f"the type of {key}"), key)
        headers, spans = [], []
        for i in range(n_tensors):
            name = read(u64(f"the name length of tensor {i}"), f"the name of tensor {i}").decode("utf-8")
            n_dims = u32(f"the dimension count of {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ModelFormatError(f"{path}: tensor {name} has {n_dims} dimensions (GGUF allows 1..{_MAX_DIMS})")
            dims = [u64(f"a dimension of {name}") for _ in range(n_dims)]
            try:
                kind = GGMLQuantizationType(u32(f"the type of {name}"))
            except ValueError as exc:
                raise ModelFormatError(f"{path}: tensor {name}: {exc}") from None
            offset = u64(f"the data offset of {name}")
            block, type_size = GGML_QUANT_SIZES[kind]
            count = 1
            for d in dims:
                count *= d
            nbytes = count // block * type_size
            spans.append((name, tuple(reversed(dims)), kind.name, offset, nbytes))
            headers.append(TensorHeader(name, tuple(reversed(dims)), kind.name, nbytes))
        data_size = size - fh.tell()  # the data section starts after the header (and its alignment)
        for name, shape, kind_name, offset, nbytes in spans:
            if offset + nbytes > data_size:
                raise ModelFormatError(f"{path}: GGUF tensor {name} of shape {shape} ({kind_name}) needs {nbytes:,} "
                                       f"bytes at offset {offset:,} of a {data_size:,}-byte data section (truncated?)")
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
