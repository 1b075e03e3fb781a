"""The Llama decoder in NumPy: ellm's readable reference model, and its fallback backend.

It has the Rust engine's interface (`set_weight`, `check_loaded`, `reset_cache`, `forward`) and
fires the same hook points with the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import ModelArgs
from ..ops import rope_scaling_params
from . import kernels as K


class NumpyLlama:
    def __init__(self, args: ModelArgs) -> None:
        self.args = args
        self.expected = args.expected_shapes()
        self.weights: dict[str, np.ndarray] = {}
        self.head_dim = args.resolved_head_dim
        kind, params = rope_scaling_params(args.rope_scaling)
        self.inv_freq = K.inv_freq(self.head_dim, args.rope_theta, kind, params)
        self.windows = args.layer_windows()
        shape = (args.num_hidden_layers, args.max_batch_size, args.num_key_value_heads, args.max_seq_len, self.head_dim)
        self.cache_k = np.zeros(shape, dtype=np.float32)
        self.cache_v = np.zeros(shape, dtype=np.float32)
        self.filled = 0  # every cached position at or past this one holds zeros

    def set_weight(self, name: str, array: np.ndarray) -> None:
        if name not in self.expected:
            raise ValueError(f"unexpected weight {name!r} for this config")
        if tuple(array.shape) != self.expected[name]:
            raise ValueError(f"weight {name!r} has shape {tuple(array.shape)}, expected {self.expected[name]}")
        self.weights[name] = array

    def check_loaded(self) -> None:
        missing = [n for n in self.expected if n not in self.weights]
        if missing:
            raise ValueError(f"weights not loaded: {', '.join(missing)}")

    def reset_cache(self) -> None:
        self.cache_k[:, :, :, :self.filled] = 0.0
        self.cache_v[:, :, :, :self.filled] = 0.0
        self.filled = 0

    def forward(self, tokens: np.ndarray, start_pos: int, all_logits: bool,
                hook: Callable | None = None, hook_names: set[str] | None = None) -> np.ndarray:
        """A step that fails (a hook's exception, KeyboardInterrupt) leaves the cache as it was."""
        batch, end = tokens.shape[0], start_pos + tokens.shape[1]
        saved = (self.filled, self.cache_k[:, :batch, :, start_pos:end].copy(),
                 self.cache_v[:, :batch, :, start_pos:end].copy())
        try:
            logits = self._forward(tokens, start_pos, all_logits, hook, hook_names)
        except BaseException:
            self.filled = saved[0]
            self.cache_k[:, :batch, :, start_pos:end] = saved[1]
            self.cache_v[:, :batch, :, start_pos:end] = saved[2]
            raise
        self.filled = max(self.filled, end)
        return logits

    def _forward(self, tokens, start_pos, all_logits, hook, hook_names):
        self.check_loaded()
        a, w = self.args, self.weights
        batch, seq = tokens.shape

        def emit(name: str, layer: int, x: np.ndarray, inner: tuple[int, ...]) -> None:
            if hook is not None and hook_names and name in hook_names:
                hook(name, np.array(x, dtype=np.float32).reshape(batch, -1, *inner), layer)

        x = w["model.embed_tokens.weight"][tokens.reshape(-1)]  # [batch * seq, hidden]
        emit("embed_tokens", -1, x, (a.hidden_size,))
        positions = np.arange(start_pos, start_pos + seq)
        cos, sin = K.rope_cos_sin(positions, self.inv_freq)
        for layer in range(a.num_hidden_layers):
            x = self._layer(layer, x, batch, seq, start_pos, cos, sin, emit)

        x = K.rms_norm(x, w["model.norm.weight"], a.rms_norm_eps)
        emit("final_norm", -1, x, (a.hidden_size,))
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        if all_logits:
            logits = K.linear(x, head)
            emit("logits", -1, logits, (a.vocab_size,))
            return logits.reshape(batch, seq, a.vocab_size)
        last = x.reshape(batch, seq, -1)[:, -1]
        logits = K.linear(last, head)
        emit("logits", -1, logits, (a.vocab_size,))
        return logits

    def _layer(self, i, x, batch, seq, start_pos, cos, sin, emit):
        a, d = self.args, self.head_dim
        p = f"model.layers.{i}."
        w = lambda name: self.weights[p + name]  # noqa: E731
        bias = lambda name: self.weights.get(p + name)  # noqa: E731
        n = lambda point: f"layer{i}_{point}"  # noqa: E731
        h = a.hidden_size

        # Attention block.
        xn = K.rms_norm(x, w("input_layernorm.weight"), a.rms_norm_eps)
        emit(n("input_layernorm"), i, xn, (h,))
        q = K.linear(xn, w("self_attn.q_proj.weight"), bias("self_attn.q_proj.bias"))
        k = K.linear(xn, w("self_attn.k_proj.weight"), bias("self_attn.k_proj.bias"))
        v = K.linear(xn, w("self_attn.v_proj.weight"), bias("self_attn.v_proj.bias"))
        q = q.reshape(batch, seq, a.num_attention_heads, d)
        k = k.reshape(batch, seq, a.num_key_value_heads, d)
        v = v.reshape(batch, seq, a.num_key_value_heads, d)
        emit(n("q_after_proj"), i, q, (a.num_attention_heads, d))
        emit(n("k_after_proj"), i, k, (a.num_key_value_heads, d))
        emit(n("v_after_proj"), i, v, (a.num_key_value_heads, d))
        if a.qk_norm:  # Qwen3: each head of q and k normalized on its own, before rope
            q = K.rms_norm(q, w("self_attn.q_norm.weight"), a.rms_norm_eps)
            k = K.rms_norm(k, w("self_attn.k_norm.weight"), a.rms_norm_eps)
        q, k = K.rotate_half(q, cos, sin), K.rotate_half(k, cos, sin)
        emit(n("q_after_rope"), i, q, (a.num_attention_heads, d))
        emit(n("k_after_rope"), i, k, (a.num_key_value_heads, d))

        end = start_pos + seq
        self.cache_k[i, :batch, :, start_pos:end] = k.transpose(0, 2, 1, 3)
        self.cache_v[i, :batch, :, start_pos:end] = v.transpose(0, 2, 1, 3)
        context = np.stack([
            K.attention(q[b], self.cache_k[i, b, :, :end].transpose(1, 0, 2), self.cache_v[i, b, :, :end].transpose(1, 0, 2),
                        True, start_pos, 1.0 / np.sqrt(d), self.windows[i])
            for b in range(batch)
        ]).reshape(batch * seq, -1)
        emit(n("attention_context"), i, context, (a.q_dim(),))
        attn_out = K.linear(context, w("self_attn.o_proj.weight"), bias("self_attn.o_proj.bias"))
        emit(n("attention_output"), i, attn_out, (h,))
        x = x + attn_out
        emit(n("after_attention_residual"), i, x, (h,))

        # MLP block.
        xn = K.rms_norm(x, w("post_attention_layernorm.weight"), a.rms_norm_eps)
        emit(n("post_attention_layernorm"), i, xn, (h,))
        gate = K.linear(xn, w("mlp.gate_proj.weight"), bias("mlp.gate_proj.bias"))
        up = K.linear(xn, w("mlp.up_proj.weight"), bias("mlp.up_proj.bias"))
        emit(n("mlp_gate_proj"), i, gate, (a.intermediate_size,))
        emit(n("mlp_up_proj"), i, up, (a.intermediate_size,))
        hidden = K.swiglu(gate, up)
        emit(n("mlp_intermediate"), i, hidden, (a.intermediate_size,))
        mlp_out = K.linear(hidden, w("mlp.down_proj.weight"), bias("mlp.down_proj.bias"))
        emit(n("mlp_output"), i, mlp_out, (h,))
        x = x + mlp_out
        emit(n("output"), i, x, (h,))
        return x
