"""GGUF files (llama.cpp), read with the `gguf` package: config from the `llama.*` metadata,
tensors dequantized to float32 by `gguf.quants`, renamed to Hugging Face names, and the
attention Q/K rows put back from llama.cpp's rotary order."""

from __future__ import annotations

import re

import numpy as np

from ..config import ModelArgs
from ..errors import ModelFormatError
from . import Checkpoint, TensorInfo

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None for tensors a Llama has no use for)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order of a Q or K projection `[d, n_in]`."""
    d, n_in = w.shape
    return w.reshape(n_head, d // n_head // 2, 2, n_in).swapaxes(1, 2).reshape(d, n_in)


def field_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises assorted errors on truncated or foreign files
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def model_args(reader, path: str) -> ModelArgs:
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ModelFormatError(f"{path}: architecture {arch!r} is not supported; ellm runs 'llama' models")

    def need(key: str):
        value = field_value(reader, f"llama.{key}")
        if value is None:
            raise ModelFormatError(f"{path}: GGUF metadata 'llama.{key}' is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    vocab = field_value(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    ctx = int(need("context_length"))
    d = {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field_value(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(field_value(reader, "llama.attention.key_length", hidden // heads)),
        "max_position_embeddings": ctx,
        "rope_theta": float(field_value(reader, "llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id", 1),
        "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id", 2),
        "pad_token_id": field_value(reader, "tokenizer.ggml.padding_token_id"),
    }
    scaling_type = field_value(reader, "llama.rope.scaling.type")
    if scaling_type == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(field_value(reader, "llama.rope.scaling.factor"))}
    return ModelArgs.from_dict(d)


def open_gguf(path: str) -> Checkpoint:
    from gguf import quants

    reader = read(path)
    args = model_args(reader, path)
    by_name = {}
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        by_name[name] = t
        shape = tuple(int(s) for s in reversed(list(t.shape)))  # GGUF lists dims fastest first
        tensors[name] = TensorInfo(shape=shape, dtype=t.tensor_type.name, nbytes=int(t.n_bytes))

    def load(name: str) -> np.ndarray:
        t = by_name[name]
        try:
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise ModelFormatError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize") from None
        w = w.reshape(tensors[name].shape)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, args.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, args.num_key_value_heads)
        return np.ascontiguousarray(w)

    return Checkpoint(path=path, args=args, tensors=tensors, load=load, format="gguf")
