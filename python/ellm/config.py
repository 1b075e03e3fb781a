"""ModelArgs: a Llama-family model's shape, with Hugging Face config names and defaults.

One description covers every family ellm runs (llama, mistral, qwen2, qwen3): they are the same
decoder with a few switches, which `ModelArgs` derives from the config the way transformers'
modeling code does (see `FAMILY_DEFAULTS` and the properties below)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ._files import read_json_object
from .errors import ModelFormatError
from .ops import check_size, is_positive_number, rope_scaling_params

SUPPORTED_ACTIVATIONS = ("silu",)

# transformers' config defaults of each family, where they differ from LlamaConfig's (which are
# ModelArgs' own): applied by `from_dict` to the keys a config leaves out.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "sliding_window": 4096},
    "qwen2": {"vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768,
              "bos_token_id": None, "eos_token_id": None, "use_sliding_window": False, "max_window_layers": 28},
    "qwen3": {"vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768, "head_dim": 128,
              "bos_token_id": None, "eos_token_id": None, "use_sliding_window": False, "max_window_layers": 28},
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_DEFAULTS)
LAYER_TYPES = ("full_attention", "sliding_attention")

# Config keys of other models that change the computation, with the values that leave it as ellm
# computes it. Any other value is refused rather than silently ignored.
_NEUTRAL_SWITCHES: dict[str, tuple] = {
    "partial_rotary_factor": (None, 1, 1.0),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "num_experts": (None, 0),
    "num_local_experts": (None, 0),
    "logits_scaling": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
    "use_qk_norm": (None, False),
    "qk_layernorm": (None, False),
}


def _id_list(value: Any, name: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a list of ints, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise TypeError(f"{name} must be an int or a list of ints, got {value!r}")


@functools.cache
def config_rules() -> dict:
    """The config rules both engines apply (config_rules.json; the Rust engine reads the same file)."""
    with open(os.path.join(os.path.dirname(__file__), "config_rules.json"), encoding="utf-8") as fh:
        return json.load(fh)


# what a KV cache can hold, and the bytes of each value
KV_CACHE_DTYPES = {"f32": 4, "f16": 2}

@dataclass
class ModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: Any = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None
    max_seq_len: int | None = None
    max_batch_size: int = 4
    # what the KV cache holds: "f32", or "f16" (half the bytes attention reads each step)
    kv_cache_dtype: str = "f32"
    dtype: str = "float32"
    model_type: str = "llama"
    sliding_window: int | None = None
    use_sliding_window: bool | None = None
    max_window_layers: int | None = None
    layer_types: list[str] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bos_token_id = _id_list(self.bos_token_id, "bos_token_id")
        self.eos_token_id = _id_list(self.eos_token_id, "eos_token_id")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.max_seq_len is None:
            self.max_seq_len = min(2048, self.max_position_embeddings)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // max(self.num_attention_heads, 1)

    # ----- the family's switches, as transformers' modeling code reads them -----

    @property
    def qkv_bias(self) -> bool:
        """Biases on q_proj, k_proj and v_proj: Qwen2 always has them, Mistral never."""
        return {"qwen2": True, "mistral": False}.get(self.model_type, bool(self.attention_bias))

    @property
    def o_proj_bias(self) -> bool:
        return False if self.model_type in ("qwen2", "mistral") else bool(self.attention_bias)

    @property
    def mlp_proj_bias(self) -> bool:
        return bool(self.mlp_bias) if self.model_type == "llama" else False

    @property
    def qk_norm(self) -> bool:
        """Qwen3's RMSNorm over each head of q and k, before rope."""
        return self.model_type == "qwen3"

    def layer_windows(self) -> list[int]:
        """Each layer's sliding attention window; 0 where a layer attends to every earlier position."""
        n = self.num_hidden_layers
        if self.model_type == "mistral":
            return [self.sliding_window or 0] * n
        if self.model_type in ("qwen2", "qwen3"):
            window = self.sliding_window if self.use_sliding_window else None
            first_sliding = self.max_window_layers if self.max_window_layers is not None else 28
            types = self.layer_types or ["sliding_attention" if window is not None and i >= first_sliding
                                         else "full_attention" for i in range(n)]
            return [window if kind == "sliding_attention" and window else 0 for kind in types]
        return [0] * n

    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.resolved_head_dim

    def q_dim(self) -> int:
        return self.num_attention_heads * self.resolved_head_dim

    def validate(self) -> bool:
        """True, or ValueError naming the broken constraint."""
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                             f"got {self.kv_cache_dtype!r}")
        rules = config_rules()
        for name in ("max_position_embeddings", *rules["positive"]):
            value = getattr(self, name)
            if name == "head_dim" and value is None:
                continue  # hidden_size / num_attention_heads, checked below
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads}) when head_dim is not given")
        sizes = {name: getattr(self, name) for name in rules["positive"]}
        sizes["head_dim"] = self.resolved_head_dim
        for a, b in rules["divisible"]:
            if sizes[a] % sizes[b]:
                raise ValueError(f"{a} ({sizes[a]}) must be divisible by {b} ({sizes[b]})")
        for name, why in rules["even"]:
            if sizes[name] % 2:
                raise ValueError(f"{name} must be even for {why}, got {sizes[name]}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not is_positive_number(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.use_sliding_window is not None and not isinstance(self.use_sliding_window, bool):
            raise ValueError(f"use_sliding_window must be true or false, got {self.use_sliding_window!r}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}")
        rope_scaling_params(self.rope_scaling)
        self._validate_family()
        self._check_sizes()
        return True

    def _check_sizes(self) -> None:
        """MemoryError for a shape no machine here could build, before anything is allocated."""
        h, q, kv, i = self.hidden_size, self.q_dim(), self.kv_dim(), self.intermediate_size
        layers, seq = self.num_hidden_layers, self.max_seq_len
        check_size(2 * layers * self.max_batch_size * kv * seq + seq * self.resolved_head_dim + 256 * layers,
                   f"the KV cache and rope tables ({layers} layers, {self.max_batch_size} x {seq} positions)")
        weights = layers * (2 * h * q + 2 * h * kv + 3 * h * i) + self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        check_size(weights // 2, f"the model's {weights:,} weights (even at 4 bits each)", itemsize=1)

    def _validate_family(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFormatError(f"model_type {self.model_type!r} is not supported; ellm runs "
                                   f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
                raise ModelFormatError(f"layer_types must list one type per layer ({self.num_hidden_layers}), "
                                       f"got {self.layer_types!r}")
            unknown = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
            if unknown:
                raise ModelFormatError(f"layer_types {unknown} are not supported; ellm runs {', '.join(LAYER_TYPES)}")
        for key, neutral in _NEUTRAL_SWITCHES.items():
            if key in self.extra and not any(self.extra[key] == v and type(self.extra[key]) is type(v)
                                             for v in neutral):
                raise ModelFormatError(f"config switch {key}={self.extra[key]!r} is not implemented by ellm")

    # ----- conversion -----

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        if not isinstance(d, dict):
            raise TypeError(f"ModelArgs.from_dict takes a dict, got {type(d).__name__}")
        d = dict(d)
        for key, value in FAMILY_DEFAULTS.get(d.get("model_type", "llama"), {}).items():
            d.setdefault(key, value)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = dict(d.pop("extra", {}) or {})
        if "rope_parameters" in d and isinstance(d["rope_parameters"], dict):
            params = dict(d.pop("rope_parameters"))
            if "rope_theta" in params:
                d.setdefault("rope_theta", params.pop("rope_theta"))
            if params.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", params)
        if "torch_dtype" in d:
            d.setdefault("dtype", d.pop("torch_dtype"))
        known = {k: v for k, v in d.items() if k in names}
        extra.update({k: v for k, v in d.items() if k not in names})
        try:
            args = cls(**known, extra=extra)
        except TypeError as exc:
            raise TypeError(f"ModelArgs: {exc}") from None
        for key in ("rope_theta", "rms_norm_eps"):
            value = getattr(args, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number, got {value!r}")
        return args

    @classmethod
    def from_config_file(cls, path: str | os.PathLike) -> ModelArgs:
        """A Hugging Face config.json or Meta's params.json."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        d = read_json_object(path, "model config")
        if "dim" in d and "n_layers" in d:
            d = _from_meta_params(d)
        return cls.from_dict(d)

    def engine_config(self) -> dict:
        """What the Rust engine's constructor takes."""
        kind, params = rope_scaling_params(self.rope_scaling)
        return {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim, "rms_norm_eps": float(self.rms_norm_eps),
            "rope_theta": float(self.rope_theta), "rope_scaling_kind": kind, "rope_scaling_params": params,
            "qkv_bias": self.qkv_bias, "o_bias": self.o_proj_bias, "mlp_bias": self.mlp_proj_bias,
            "qk_norm": self.qk_norm, "layer_windows": self.layer_windows(),
            "tie_word_embeddings": bool(self.tie_word_embeddings), "max_seq_len": self.max_seq_len,
            "max_batch_size": self.max_batch_size, "kv_cache_dtype": self.kv_cache_dtype,
            "tensors": [(name, list(shape)) for name, shape in self.expected_shapes().items()],
        }

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model by Hugging Face name, with its shape."""
        h, q, kv, i = self.hidden_size, self.q_dim(), self.kv_dim(), self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = (h,)
            for proj, out_dim, in_dim in (("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q)):
                shapes[f"{p}self_attn.{proj}_proj.weight"] = (out_dim, in_dim)
                if self.o_proj_bias if proj == "o" else self.qkv_bias:
                    shapes[f"{p}self_attn.{proj}_proj.bias"] = (out_dim,)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (self.resolved_head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (self.resolved_head_dim,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            for proj, out_dim, in_dim in (("gate", i, h), ("up", i, h), ("down", h, i)):
                shapes[f"{p}mlp.{proj}_proj.weight"] = (out_dim, in_dim)
                if self.mlp_proj_bias:
                    shapes[f"{p}mlp.{proj}_proj.bias"] = (out_dim,)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def num_parameters(self) -> int:
        total = 0
        for shape in self.expected_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


def _from_meta_params(p: dict) -> dict:
    """Meta's params.json in Hugging Face names (FFN size as Meta's model.py computes it)."""
    dim, multiple_of = p["dim"], p.get("multiple_of", 256)
    for key, value in (("dim", dim), ("multiple_of", multiple_of), ("n_heads", p.get("n_heads")),
                       ("n_layers", p.get("n_layers"))):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"params.json: {key} must be a positive int, got {value!r}")
    multiplier = p.get("ffn_dim_multiplier")
    if multiplier is not None and not is_positive_number(multiplier):
        raise ValueError(f"params.json: ffn_dim_multiplier must be a finite number > 0, got {multiplier!r}")
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    vocab = p.get("vocab_size", -1)
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"params.json: vocab_size must be a positive int, got {vocab!r}")
    d = {
        "hidden_size": dim, "num_hidden_layers": p["n_layers"], "num_attention_heads": p["n_heads"],
        "num_key_value_heads": p.get("n_kv_heads") or p["n_heads"], "intermediate_size": hidden,
        "rms_norm_eps": p.get("norm_eps", 1e-5), "rope_theta": p.get("rope_theta", 10000.0), "vocab_size": vocab,
    }
    if p.get("use_scaled_rope"):
        d["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps",
             "rope_theta", "vocab_size", "use_scaled_rope"}
    d.update({k: v for k, v in p.items() if k not in known})
    return d
