"""safetensors checkpoints (a file, a folder, or a sharded folder with an index).

The header is read as the format defines it (8-byte length, JSON) and each tensor is mapped
with `numpy.memmap` only while it is converted, so loading never holds a second copy of the
model: NumPy has no bfloat16, which is why we map the bytes ourselves rather than going
through `safetensors.numpy`.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from ..config import ModelArgs
from ..errors import ModelFormatError
from . import Checkpoint, TensorInfo

_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def read_header(path: str) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data section), checked as the safetensors
    library checks it (offsets cover the data section exactly, in order, with no overlap; sizes
    match dtype and shape) and, beyond it, refusing duplicate keys."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelFormatError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ModelFormatError(f"{path} is truncated: its header says {n} bytes, the file has {size - 8} after the length")
        try:
            header = json.loads(fh.read(n), object_pairs_hook=_unique_keys)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{path} has a corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: the safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise ModelFormatError(f"{path}: __metadata__ must map names to strings, got {metadata!r:.80}")
    data_start, data_size = 8 + n, size - 8 - n
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ModelFormatError(f"{where} needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise ModelFormatError(f"{where} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ModelFormatError(f"{where}: shape must be a list of non-negative ints, got {shape!r:.80}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ModelFormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                                   f"got {offsets!r:.80}")
        count = 1
        for d in shape:
            count *= d
        if count * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
            raise ModelFormatError(f"{where}: shape {tuple(shape)} of {dtype} needs {count * _ITEMSIZE[dtype]} "
                                   f"bytes, its data_offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            what = "overlaps the tensor before it" if begin < covered else f"leaves bytes {covered}..{begin} unused"
            raise ModelFormatError(f"{path}: tensor {name!r} (data_offsets [{begin}, {end}]) {what}")
        covered = end
    if covered != data_size:
        raise ModelFormatError(f"{path}: the tensors cover {covered} bytes of a {data_size}-byte data section "
                               f"({'truncated' if covered > data_size else 'trailing bytes'})")
    return header, data_start


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return found


def open_safetensors(path: str) -> Checkpoint:
    where: dict[str, tuple[str, int, dict]] = {}
    tensors: dict[str, TensorInfo] = {}
    for file in _files(path):
        header, data_start = read_header(file)
        for name, entry in header.items():
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            tensors[name] = TensorInfo(shape=shape, dtype=dtype, nbytes=end - begin)
            where[name] = (file, data_start, entry)

    def load(name: str) -> np.ndarray:
        file, data_start, entry = where[name]
        dtype, shape = entry["dtype"], tuple(entry["shape"])
        if dtype not in _NUMPY_DTYPES:
            raise ModelFormatError(f"tensor {name!r} has dtype {dtype}; ellm reads F32, F16, BF16 and F64")
        begin, end = entry["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        if count * _ITEMSIZE[dtype] != end - begin:
            raise ModelFormatError(f"tensor {name!r}: shape {shape} of {dtype} does not match its {end - begin} bytes")
        mapped = np.memmap(file, dtype=_NUMPY_DTYPES[dtype], mode="r", offset=data_start + begin, shape=(count,))
        if dtype == "F32":
            return mapped.reshape(shape)  # no copy: the engine copies once, the NumPy model keeps the map
        if dtype == "BF16":
            return (mapped.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return mapped.astype(np.float32).reshape(shape)

    def load_into(engine, name: str, dtype: str, allow_non_finite: bool = False, target: str | None = None) -> bool:
        """Half-precision matrices go into the engine as stored when dtype is "auto"."""
        file, data_start, entry = where[name]
        if dtype != "auto" or entry["dtype"] not in ("F16", "BF16") or len(entry["shape"]) != 2:
            return False
        begin, end = entry["data_offsets"]
        raw = np.memmap(file, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
        engine.set_weight_stored(target or name, entry["dtype"], tuple(entry["shape"]), raw, "auto", allow_non_finite)
        return True

    args = None
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isfile(os.path.join(folder, "config.json")):
        args = ModelArgs.from_config_file(os.path.join(folder, "config.json"))
    return Checkpoint(path=path, args=args, tensors=tensors, load=load, format="safetensors", load_into=load_into)
