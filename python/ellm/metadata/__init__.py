"""Model metadata: per-tensor and per-block parameters, compute and memory, as JSON, read from
tensor headers alone (never the weights), plus a roofline estimate and a partition planner."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from .counting import count_blocks, totals
from .naming import COST, block_of, is_transformer, layer_type
from .partition import PartitionPlan, plan_partition
from .records import BlockMetadata, LayerMetadata, ModelMetadata
from .roofline import MachineModel, estimate, measure_machine
from .sources import TensorHeader, from_path, from_state_dict

__all__ = [
    "MetadataConfig", "MetadataGenerator", "ModelMetadata", "LayerMetadata", "BlockMetadata",
    "generate_metadata", "estimate", "measure_machine", "MachineModel", "plan_partition", "PartitionPlan",
    "compute_required",
]


@dataclass
class MetadataConfig:
    model_name: str
    model_path: Any  # a path, a Transformer, or a dict of arrays
    batch_size: int = 1
    sequence_length: int = 512
    node_id: str | None = None
    # What the KV cache holds, "f32" or "f16"; None: a Transformer's own, f32 for anything else.
    kv_cache_dtype: str | None = None


def _kv_cache(config: MetadataConfig) -> tuple[str, int]:
    """The KV cache's dtype, and the bytes of one of its values."""
    from ..config import KV_CACHE_DTYPES
    from ..model import Transformer

    dtype = config.kv_cache_dtype
    if dtype is None:
        dtype = config.model_path.model_args.kv_cache_dtype if isinstance(config.model_path, Transformer) else "f32"
    elif dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, got {dtype!r}")
    return dtype, KV_CACHE_DTYPES[dtype]


def compute_required(num_params: int, kind: str, batch_size: int, sequence_length: int, model_type: str) -> float:
    """The original tool's score: params x cost of the type x batch (x sequence/512 for transformers)."""
    scale = sequence_length / 512 if model_type == "transformer" else 1
    return num_params * COST[kind] * batch_size * scale


def _headers(source: Any) -> tuple[list[TensorHeader], str]:
    from ..model import Transformer

    if isinstance(source, Transformer):
        shapes = source.model_args.expected_shapes()
        return [TensorHeader(n, s, "F32", 4 * _count(s)) for n, s in shapes.items()], "transformer"
    if isinstance(source, dict):
        return from_state_dict(source), "state_dict"
    if isinstance(source, (str, os.PathLike)):
        headers, _, fmt = from_path(source)
        return headers, fmt
    raise TypeError(f"metadata source must be a path, a Transformer or a dict of arrays, got {type(source).__name__}")


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class MetadataGenerator:
    def generate_metadata(self, config: MetadataConfig) -> ModelMetadata:
        if config.batch_size <= 0 or config.sequence_length <= 0:
            raise ValueError(f"batch_size and sequence_length must be positive, got {config.batch_size}, "
                             f"{config.sequence_length}")
        kv_dtype, kv_bytes = _kv_cache(config)
        headers, fmt = _headers(config.model_path)
        if not headers:
            raise ValueError(f"{config.model_path!r} holds no tensors")
        model_type = "transformer" if is_transformer([h.name for h in headers]) else "generic"
        layers = []
        for h in headers:
            kind = layer_type(h.name, h.shape)
            n = _count(h.shape)
            layers.append(LayerMetadata(
                name=h.name, shape=list(h.shape), num_params=n,
                compute_required=compute_required(n, kind, config.batch_size, config.sequence_length, model_type),
                layer_type=kind, dtype=h.dtype, block=block_of(h.name), weight_bytes=h.nbytes))
        blocks = count_blocks(headers, config.batch_size, config.sequence_length, kv_bytes)
        return ModelMetadata(
            model_name=config.model_name, model_type=model_type, batch_size=config.batch_size,
            sequence_length=config.sequence_length, layers=layers,
            total_compute=sum(x.compute_required for x in layers), total_layers=len(layers),
            generated_at=time.time(), node_id=config.node_id, blocks=blocks, totals=totals(blocks),
            source_format=fmt, kv_cache_dtype=kv_dtype)

    @staticmethod
    def save_metadata(metadata: ModelMetadata, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(metadata.to_json())


def generate_metadata(source: Any, model_name: str | None = None, batch_size: int = 1, sequence_length: int = 512,
                      node_id: str | None = None, kv_cache_dtype: str | None = None) -> ModelMetadata:
    """Metadata of a path (Hugging Face folder, .safetensors, .gguf), a Transformer or a state_dict.
    `kv_cache_dtype` ("f32" or "f16") sizes the KV cache; by default a Transformer's own, else f32."""
    if model_name is None:
        model_name = os.path.basename(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    return MetadataGenerator().generate_metadata(MetadataConfig(model_name, source, batch_size, sequence_length, node_id,
                                                                kv_cache_dtype))
