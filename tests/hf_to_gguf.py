"""Write a Hugging Face folder (config.json + model.safetensors) as a GGUF file the way llama.cpp's
convert_hf_to_gguf.py does for the Llama-shaped families: its architecture names and metadata
keys, its tensor names, the Q/K row permutation it applies to Llama and Mistral (not Qwen), and
Llama 3 rope scaling as a `rope_freqs` tensor of per-frequency factors.

Test code only: the model under test must read what this writes as it reads llama.cpp's files.
"""

from __future__ import annotations

import json
import math
import os

import gguf
import numpy as np
from safetensors.numpy import load_file

# Hugging Face model_type -> llama.cpp architecture (its converter writes Mistral as llama)
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row order of a Q or K projection (LlamaModel.permute)."""
    d, n_in = w.shape
    return w.reshape(n_head, 2, d // n_head // 2, n_in).swapaxes(1, 2).reshape(d, n_in)


def llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray:
    p = config["rope_parameters"]
    base, factor = p["rope_theta"], p["factor"]
    low, high, old = p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def convert(folder: str | dict, out: str, qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
            extra_tensors: dict[str, np.ndarray] | None = None, sliding_window: int | None = None,
            tensors: dict[str, np.ndarray] | None = None,
            raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None) -> str:
    """`folder` is a Hugging Face folder, or a config dict with `tensors` given; `raw` holds
    matrices already in blocks (bytes `[rows, row_bytes]`, type), written as they are (their
    rows are taken to be in the file's order)."""
    if isinstance(folder, dict):
        config = folder
    else:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
        tensors = load_file(os.path.join(folder, "model.safetensors"))
    arch = ARCH[config["model_type"]]
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    if sliding_window:
        w.add_sliding_window(sliding_window)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(config["vocab_size"])])
    w.add_token_types([gguf.TokenType.NORMAL] * config["vocab_size"])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(config, head_dim))
    for name, (blocks, kind) in (raw or {}).items():
        w.add_tensor(gguf_name(name), np.ascontiguousarray(blocks, dtype=np.uint8), raw_dtype=kind)
    for name, t in {**(tensors or {}), **(extra_tensors or {})}.items():
        if name in (raw or {}):
            continue
        t = np.ascontiguousarray(t, dtype=np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = permute(t, kv_heads)
        target = gguf_name(name) if name in _GLOBAL or name.startswith("model.layers.") else name
        if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(target, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(target, t)
    finish(w)
    return out


def finish(w: gguf.GGUFWriter) -> None:
    """Write the header, the metadata and the tensors, and close the file."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
