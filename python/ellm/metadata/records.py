"""The metadata JSON: the original metadata-generator's fields, kept one for one, plus ellm's
additions (per-tensor block and bytes, per-block costs, totals)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerMetadata:
    name: str
    shape: list[int]
    num_params: int
    compute_required: float
    layer_type: str
    dtype: str
    block: str = "head"
    weight_bytes: int = 0


@dataclass
class BlockMetadata:
    name: str
    params: int
    weight_bytes: int
    flops_prefill: int
    flops_decode: int
    kv_cache_bytes: int
    arithmetic_intensity_prefill: float
    arithmetic_intensity_decode: float
    # Bytes of another block's tensors this one needs too: a tied head multiplies by the embedding
    # matrix, so a node holding the head without the embedding holds a copy of it.
    shared_weight_bytes: int = 0


@dataclass
class ModelMetadata:
    model_name: str
    model_type: str
    batch_size: int
    sequence_length: int
    layers: list[LayerMetadata]
    total_compute: float
    total_layers: int
    generated_at: float
    node_id: str | None = None
    blocks: list[BlockMetadata] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    source_format: str | None = None
    kv_cache_dtype: str = "f32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMetadata:
        d = dict(d)
        d["layers"] = [LayerMetadata(**x) for x in d.get("layers", [])]
        d["blocks"] = [BlockMetadata(**x) for x in d.get("blocks", [])]
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelMetadata:
        with open(path, encoding="utf-8") as fh:
            try:
                return cls.from_dict(json.load(fh))
            except (json.JSONDecodeError, TypeError) as exc:
                raise ValueError(f"{path} is not ellm model metadata: {exc}") from None

    def block(self, name: str) -> BlockMetadata:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)
