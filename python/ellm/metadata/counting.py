"""Per-block parameters, bytes, FLOPs and KV-cache size, from tensor shapes alone.

FLOPs count matrix products only, 2*m*n*k each: every weight matrix of a decoder block once per
token, attention scores (Q K^T) and the weighted sum of values, and the output head. For batch B
and sequence length S:
- prefill: B*S tokens in one pass, logits at every position; query t (1-based) sees t keys, so
  attention costs 2 * 2 * q_dim * B * S(S+1)/2;
- decode: one token per sequence after S, seeing S+1 keys: 2 * 2 * q_dim * B * (S+1).
KV cache: keys and values of S positions for every sequence, of E bytes each (4 for f32, 2 for
f16): 2 * E * B * S * kv_dim bytes.
Arithmetic intensity: FLOPs per byte of weights and KV cache the step reads.
"""

from __future__ import annotations

import re

from .naming import block_of, is_fused_qkv, is_key_projection, is_output_head, is_query_projection
from .records import BlockMetadata
from .sources import TensorHeader


def _params(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _block_order(name: str):
    if name == "embed":
        return (0, 0)
    m = re.match(r"layers\.(\d+)$", name)
    return (1, int(m.group(1))) if m else (2, 0)


def _attention_dims(tensors: list[TensorHeader]) -> tuple[int, int]:
    """(q_dim, kv_dim) of one decoder block, read off its projection shapes (0 if none)."""
    q_dim = kv_dim = 0
    for t in tensors:
        if is_query_projection(t.name) and len(t.shape) == 2:
            q_dim = t.shape[0]
        elif is_key_projection(t.name) and len(t.shape) == 2:
            kv_dim = t.shape[0]
        elif is_fused_qkv(t.name) and len(t.shape) == 2:
            # GPT-2's Conv1D stores [in, 3 * out]; fused GGUF/HF qkv store [3 * out, in]
            q_dim = max(t.shape) // 3
    return q_dim, (kv_dim or q_dim)


def count_blocks(headers: list[TensorHeader], batch: int, seq: int, kv_value_bytes: int = 4) -> list[BlockMetadata]:
    groups: dict[str, list[TensorHeader]] = {}
    for t in headers:
        groups.setdefault(block_of(t.name), []).append(t)
    embedding = next((t for t in groups.get("embed", []) if len(t.shape) == 2), None)
    has_head_matrix = any(is_output_head(t.name) for t in groups.get("head", []))
    blocks = []
    for name in sorted(groups, key=_block_order):
        tensors = groups[name]
        params = sum(_params(t.shape) for t in tensors)
        weight_bytes = sum(t.nbytes for t in tensors)
        bytes_read = weight_bytes
        shared = 0
        flops_prefill = flops_decode = kv_bytes = 0
        if name.startswith("layers."):
            matrix_flops = sum(2 * _params(t.shape) for t in tensors if len(t.shape) == 2)
            q_dim, kv_dim = _attention_dims(tensors)
            flops_prefill = matrix_flops * batch * seq + 2 * q_dim * batch * seq * (seq + 1)
            flops_decode = matrix_flops * batch + 4 * q_dim * batch * (seq + 1)
            kv_bytes = 2 * kv_value_bytes * batch * seq * kv_dim
        elif name == "head":
            head = next((t for t in tensors if is_output_head(t.name)), None)
            if head is None and not has_head_matrix and embedding is not None:
                head = embedding  # tied: the embedding matrix is the output projection
                bytes_read += embedding.nbytes
                shared = embedding.nbytes
            if head is not None:
                flops_prefill = 2 * _params(head.shape) * batch * seq
                flops_decode = 2 * _params(head.shape) * batch
        moved = max(1, bytes_read + kv_bytes)
        blocks.append(BlockMetadata(name=name, params=params, weight_bytes=weight_bytes,
                                    flops_prefill=flops_prefill, flops_decode=flops_decode,
                                    kv_cache_bytes=kv_bytes,
                                    arithmetic_intensity_prefill=flops_prefill / moved,
                                    arithmetic_intensity_decode=flops_decode / moved,
                                    shared_weight_bytes=shared))
    return blocks


def totals(blocks: list[BlockMetadata]) -> dict[str, int]:
    keys = ("params", "weight_bytes", "flops_prefill", "flops_decode", "kv_cache_bytes")
    return {k: sum(getattr(b, k) for b in blocks) for k in keys}
