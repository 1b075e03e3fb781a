"""GGUF files (llama.cpp): config from the `{arch}.*` metadata (architectures llama, qwen2,
qwen3), tensors renamed to Hugging Face names, and, for llama, the attention Q/K rows put back
from the rotary order that llama.cpp's converter gives them (it leaves Qwen's as they are).

The Rust engine takes each tensor from the Rust reader as stored (quantized blocks stay blocks);
float32 copies come from that reader or, without the extension, from the `gguf` package's
mapping dequantized by `numpy_backend.quants`."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping

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


class GgufContents:
    """A GGUF file opened for reading: `metadata` (key -> value, arrays as lists), `tensors`
    (GGUF name -> TensorInfo with the shape slowest first) and `read(name)` (float32 values).

    With the Rust extension the file is parsed once by its reader (`native`), whose metadata
    arrives in one call and whose tensors the engine reads in place; without it, by the `gguf`
    package, dequantized by `numpy_backend.quants`."""

    def __init__(self, path: str, native=None, reader=None) -> None:
        self.path = path
        self.native = native
        self._reader = reader
        if native is not None:
            self.metadata = _NativeFields(native)
            listed = native.tensors()
        else:
            self.metadata = _LazyFields(reader)
            listed = [(t.name, [int(s) for s in reversed(list(t.shape))], t.tensor_type.name, int(t.n_bytes))
                      for t in reader.tensors]
        self.tensors = {name: TensorInfo(shape=tuple(shape), dtype=kind, nbytes=nbytes)
                        for name, shape, kind, nbytes in listed}

    def read(self, name: str) -> np.ndarray:
        if self.native is not None:
            return self.native.read(name)
        from ..numpy_backend.quants import dequantize

        t = next(t for t in self._reader.tensors if t.name == name)
        return dequantize(np.asarray(t.data).view(np.uint8), t.tensor_type.name, self.tensors[name].shape)


class _NativeFields(Mapping):
    """The Rust reader's metadata, each value made a Python object when first asked for (the
    vocabulary only when a tokenizer is built)."""

    def __init__(self, native) -> None:
        self._native = native
        self._keys = native.keys()
        self._cache: dict = {}

    def __getitem__(self, key: str):
        if key not in self._cache:
            value = self._native.get(key)
            if value is None:
                raise KeyError(key)
            self._cache[key] = value
        return self._cache[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _LazyFields(Mapping):
    """The `gguf` package's fields, each decoded only when asked for (a vocabulary is large)."""

    def __init__(self, reader) -> None:
        self._fields = reader.fields

    def __getitem__(self, key: str):
        if key not in self._fields:
            raise KeyError(key)
        return self._fields[key].contents()

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


# GGUF value types: fixed sizes, 8 = string, 9 = array (see the GGUF specification)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def tensor_headers(path: str) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(GGUF name, shape slowest first, type, bytes) of every tensor, from the header alone: by the
    Rust reader where the extension is built, else parsed here with the key/value section skipped
    over, not decoded (a large vocabulary costs nothing). Either way every count, length and size
    is checked against the file's size before it is used, so a hostile header fails in
    milliseconds; the `gguf` package's reader is opened only after this."""
    from .._backend import rust_available

    if rust_available():
        from .. import _lowlevel

        return [(name, tuple(shape), kind, nbytes) for name, shape, kind, nbytes in _lowlevel.GgufReader(path).tensors()]
    try:
        return _python_headers(path)
    except ModelFormatError:
        raise
    except (struct.error, OverflowError, OSError, MemoryError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


_MAX_DIMS = 4  # GGML_MAX_DIMS


def _python_headers(path: str) -> list[tuple[str, tuple[int, ...], str, int]]:
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
            headers.append((name, tuple(reversed(dims)), kind.name, nbytes))
        data_size = size - fh.tell()  # the data section starts after the header (and its alignment)
        for name, shape, kind_name, offset, nbytes in spans:
            if offset + nbytes > data_size:
                raise ModelFormatError(f"{path}: GGUF tensor {name} of shape {shape} ({kind_name}) needs {nbytes:,} "
                                       f"bytes at offset {offset:,} of a {data_size:,}-byte data section (truncated?)")
    return headers


def read(path: str) -> GgufContents:
    """Open a GGUF file; a truncated or corrupt one raises ModelFormatError."""
    from .._backend import rust_available

    if rust_available():
        from .. import _lowlevel

        return GgufContents(path, native=_lowlevel.GgufReader(path))
    import gguf

    tensor_headers(path)  # every count and size against the file's length first: fails in milliseconds
    try:
        return GgufContents(path, reader=gguf.GGUFReader(path))
    except Exception as exc:  # the reader raises assorted errors on truncated or foreign files
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def model_args(contents: GgufContents, path: str) -> ModelArgs:
    meta = contents.metadata
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelFormatError(f"{path}: architecture {arch!r} is not supported; ellm runs "
                               f"{', '.join(_ARCHITECTURES)}")

    def need(key: str):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise ModelFormatError(f"{path}: GGUF metadata '{arch}.{key}' is missing")
        return value

    def optional(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tensors = contents.tensors
    embedding = tensors.get("token_embd.weight")
    vocab = optional("vocab_size") or (embedding.shape[0] if embedding else len(meta.get("tokenizer.ggml.tokens") or ()))
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
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", 1),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", 2),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
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
        factors = np.asarray(contents.read(ROPE_FREQS), dtype=np.float64).reshape(-1)
        d["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.tolist()}
    return ModelArgs.from_dict(d)


def open_gguf(path: str) -> Checkpoint:
    contents = read(path)
    args = model_args(contents, path)
    gguf_names = {}
    tensors: dict[str, TensorInfo] = {}
    for gguf_name, info in contents.tensors.items():
        if gguf_name == ROPE_FREQS:
            continue  # read into args.rope_scaling
        name = hf_name(gguf_name) or gguf_name  # a tensor ellm has no name for stays, to be refused by name
        gguf_names[name] = gguf_name
        tensors[name] = info

    def heads_to_unpermute(name: str) -> int:
        if args.model_type not in ("llama", "mistral"):
            return 0  # llama.cpp's converter permutes only Llama-arch Q/K rows
        if name.endswith("self_attn.q_proj.weight"):
            return args.num_attention_heads
        if name.endswith("self_attn.k_proj.weight"):
            return args.num_key_value_heads
        return 0

    def load(name: str) -> np.ndarray:
        w = contents.read(gguf_names[name])
        heads = heads_to_unpermute(name)
        return np.ascontiguousarray(unpermute_rows(w, heads) if heads else w)

    def load_into(engine, name: str, dtype: str, allow_non_finite: bool = False, target: str | None = None) -> bool:
        engine.load_gguf(contents.native, gguf_names[name], target or name, dtype, heads_to_unpermute(name),
                         allow_non_finite)
        return True

    return Checkpoint(path=path, args=args, tensors=tensors, load=load, format="gguf",
                      load_into=load_into if contents.native is not None else None, contents=contents)
