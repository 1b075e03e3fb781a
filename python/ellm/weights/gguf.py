"""GGUF files (llama.cpp), read with the `gguf` package: config from the `{arch}.*` metadata
(architectures llama, qwen2, qwen3), tensors dequantized to float32 by `gguf.quants`, renamed to
Hugging Face names, and, for llama, the attention Q/K rows put back from the rotary order that
llama.cpp's converter gives them (it leaves Qwen's as they are)."""

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
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
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
# general.architecture -> the Hugging Face model_type it was converted from
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp's rope frequency factors (Llama 3 scaling), folded into ModelArgs.rope_scaling
ROPE_FREQS = "rope_freqs.weight"


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

    from ..metadata.sources import from_gguf

    from_gguf(path)  # every count and size against the file's length first: fails in milliseconds
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises assorted errors on truncated or foreign files
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def model_args(reader, path: str) -> ModelArgs:
    arch = field_value(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelFormatError(f"{path}: architecture {arch!r} is not supported; ellm runs "
                               f"{', '.join(_ARCHITECTURES)}")

    def need(key: str):
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise ModelFormatError(f"{path}: GGUF metadata '{arch}.{key}' is missing")
        return value

    def optional(key: str, default=None):
        return field_value(reader, f"{arch}.{key}", default)

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    vocab = optional("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tensors = {t.name: t for t in reader.tensors}
    d = {
        "model_type": _ARCHITECTURES[arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(optional("attention.head_count_kv", heads)),
        "head_dim": int(optional("attention.key_length", hidden // max(heads, 1))),
        "max_position_embeddings": int(need("context_length")),
        "rope_theta": float(optional("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id", 1),
        "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id", 2),
        "pad_token_id": field_value(reader, "tokenizer.ggml.padding_token_id"),
    }
    window = optional("attention.sliding_window")
    if window:
        d.update(sliding_window=int(window), use_sliding_window=True, max_window_layers=0)
        if arch == "llama":
            d["model_type"] = "mistral"  # a window over every layer, as Mistral has it
    scaling_type = optional("rope.scaling.type")
    if scaling_type == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(optional("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ModelFormatError(f"{path}: rope scaling {scaling_type!r} is not supported")
    if ROPE_FREQS in tensors:
        from gguf import quants

        t = tensors[ROPE_FREQS]
        factors = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        d["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.tolist()}
    return ModelArgs.from_dict(d)


def open_gguf(path: str) -> Checkpoint:
    from gguf import quants

    reader = read(path)
    args = model_args(reader, path)
    by_name = {}
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # read into args.rope_scaling
        name = hf_name(t.name) or t.name  # a tensor ellm has no name for stays, to be refused by name
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
        if args.model_type not in ("llama", "mistral"):
            pass  # llama.cpp's converter permutes only Llama-arch Q/K rows
        elif name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, args.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, args.num_key_value_heads)
        return np.ascontiguousarray(w)

    return Checkpoint(path=path, args=args, tensors=tensors, load=load, format="gguf")
