"""Checkpoint readers: a Hugging Face folder (safetensors) or a GGUF file, read as named float32
arrays one at a time (so a model never sits in memory twice) plus the ModelArgs they imply."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ModelArgs


@dataclass
class TensorInfo:
    """What a header says about one tensor, under its Hugging Face name."""

    shape: tuple[int, ...]
    dtype: str          # as stored: "F32", "F16", "BF16", "Q4_1", ...
    nbytes: int         # bytes as stored


@dataclass
class Checkpoint:
    """A model on disk: its config (None where no config came with it), its tensors' headers,
    `load(name)`, which reads one tensor as float32, and `load_into(engine, name, dtype,
    allow_non_finite, target=None)`, which puts one tensor into a Rust engine (under `target`, a
    pipeline stage's name for it, where given) kept as `dtype` says ("auto": as stored) and
    returns whether it did."""

    path: str
    args: ModelArgs | None
    tensors: dict[str, TensorInfo]
    load: Callable[[str], np.ndarray]
    format: str         # "safetensors" or "gguf"
    load_into: Callable[..., bool] | None = None
    contents: Any = None  # the opened file, where its reader has more to give (a GGUF's metadata)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a Hugging Face folder, a .safetensors file or a .gguf file (headers only)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}")
    if os.path.isdir(path) or path.endswith(".safetensors"):
        from .safetensors import open_safetensors
        return open_safetensors(path)
    if path.endswith(".gguf"):
        from .gguf import open_gguf
        return open_gguf(path)
    from ..errors import ModelFormatError
    raise ModelFormatError(f"{path} is not a model ellm reads: expected a Hugging Face folder, a .safetensors file or a .gguf file")
