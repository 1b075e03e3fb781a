"""What a tensor is, read from its name: the layer type the original metadata tool scored, and
the block (decoder layer, embedding or head) it belongs to. Llama/Hugging Face, GPT-2, BERT and
GGUF naming schemes."""

from __future__ import annotations

import re

# Cost per parameter of each layer type, as the original metadata-generator defined it.
COST = {"attention": 4.0, "linear": 2.0, "conv2d": 2.0, "layernorm": 1.0, "embedding": 0.5,
        "activation": 0.1, "pooling": 0.2}

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blk|block|blocks)\.(\d+)\.")
_NORM = re.compile(r"(norm|ln_\d+|ln_f|layernorm|LayerNorm)", re.IGNORECASE)
_EMBED = re.compile(r"(embed_tokens|token_embd|wte|wpe|word_embeddings|position_embeddings|"
                    r"token_type_embeddings|tok_embeddings)")
_HEAD = re.compile(r"(^|\.)(lm_head|output|cls)\b|^output\.weight$")
_ATTENTION = re.compile(r"(self_attn|\.attn\.|\.attention\.|attn_q|attn_k|attn_v|attn_output|attn_qkv|\.attn_)")
_MLP = re.compile(r"(\.mlp\.|ffn_|intermediate\.dense|\.output\.dense|feed_forward)")


def layer_type(name: str, shape: tuple[int, ...]) -> str:
    """The original tool's layer type for a tensor, from the naming schemes we know."""
    if _NORM.search(name):
        return "layernorm"
    if _EMBED.search(name):
        return "embedding"
    if "pooler" in name:
        return "pooling"
    if "conv" in name.lower() and len(shape) == 4:
        return "conv2d"
    if _ATTENTION.search(name):
        return "attention"
    if _MLP.search(name) or _HEAD.search(name):
        return "linear"
    return "linear"


def block_of(name: str) -> str:
    """`layers.{i}` for a decoder layer's tensors, `embed` for embeddings, `head` for the final
    norm and output projection (and anything after the last layer)."""
    m = _LAYER_INDEX.search(name)
    if m:
        return f"layers.{m.group(1)}"
    if _EMBED.search(name):
        return "embed"
    return "head"


def is_transformer(names: list[str]) -> bool:
    return any(_ATTENTION.search(n) for n in names)


def is_query_projection(name: str) -> bool:
    return bool(re.search(r"(q_proj|attn_q\.|\.query\.|wq)\.?weight$|attn_q\.weight$", name))


def is_fused_qkv(name: str) -> bool:
    return bool(re.search(r"(c_attn|attn_qkv|qkv_proj)\.weight$", name))


def is_key_projection(name: str) -> bool:
    return bool(re.search(r"(k_proj|attn_k|\.key|wk)\.weight$", name))


def is_output_head(name: str) -> bool:
    return bool(re.search(r"(^|\.)(lm_head|output)\.weight$", name)) and not _LAYER_INDEX.search(name)
