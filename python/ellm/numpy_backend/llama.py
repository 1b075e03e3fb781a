"""The Llama decoder in NumPy: ellm's readable reference model, and its fallback backend.

It has the Rust engine's interface (`set_weight`, `check_loaded`, `reset_cache`, `forward`, the
ragged `step` over KV slots and the slot operations) and fires the same hook points with the same
shapes. Built for a pipeline `Stage`, it holds that stage's layers only and its steps take or
return hidden states where the stage does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import ModelArgs
from .. import hooks as H
from ..batch_rules import check_row_counts, check_token_ids, slot_runs
from ..ops import rope_scaling_params
from ..stage import Stage
from . import kernels as K


class NumpyLlama:
    def __init__(self, args: ModelArgs, stage: Stage | None = None) -> None:
        self.args = args
        self.stage = stage or Stage.whole(args)
        self.expected = self.stage.expected_shapes(args)
        self.weights: dict[str, np.ndarray] = {}
        self.head_dim = args.resolved_head_dim
        kind, params = rope_scaling_params(args.rope_scaling)
        self.inv_freq = K.inv_freq(self.head_dim, args.rope_theta, kind, params)
        self.windows = self.stage.layer_windows(args)
        # one slot per sequence: [layers, slots, kv_heads, max_seq_len, head_dim]
        shape = (self.stage.num_layers, args.max_batch_size, args.num_key_value_heads, args.max_seq_len, self.head_dim)
        cache_dtype = np.float16 if args.kv_cache_dtype == "f16" else np.float32  # stores round to nearest
        self.cache_k = np.zeros(shape, dtype=cache_dtype)
        self.cache_v = np.zeros(shape, dtype=cache_dtype)
        self.filled = [0] * args.max_batch_size  # per slot: every position at or past it holds zeros

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

    # ----- KV slots -----

    def num_slots(self) -> int:
        return len(self.filled)

    def slot_lengths(self) -> list[int]:
        return list(self.filled)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < len(self.filled):
            raise ValueError(f"slot {slot} does not exist: the cache has {len(self.filled)} slots")

    def truncate_slot(self, slot: int, n: int) -> None:
        self._check_slot(slot)
        if n < self.filled[slot]:
            self.cache_k[:, slot, :, n:self.filled[slot]] = 0.0
            self.cache_v[:, slot, :, n:self.filled[slot]] = 0.0
            self.filled[slot] = n

    def copy_slot(self, src: int, dst: int, n: int) -> None:
        self._check_slot(src)
        self._check_slot(dst)
        if n > self.filled[src]:
            raise ValueError(f"slot {src} holds {self.filled[src]} positions, cannot copy {n}")
        keys, values = self.cache_k[:, src, :, :n].copy(), self.cache_v[:, src, :, :n].copy()
        self.truncate_slot(dst, 0)
        self.cache_k[:, dst, :, :n], self.cache_v[:, dst, :, :n] = keys, values
        self.filled[dst] = n

    def reset_cache(self) -> None:
        for slot in range(len(self.filled)):
            self.truncate_slot(slot, 0)

    # ----- steps -----

    def forward(self, tokens: np.ndarray, start_pos: int, all_logits: bool,
                hook: Callable | None = None, hook_names: set[str] | None = None) -> np.ndarray:
        """Meta's forward: `[batch, seq]` tokens, sequence b in slot b at start_pos.."""
        if not self.stage.is_whole:
            raise ValueError("a pipeline stage runs ragged steps only, not forward")
        batch, seq = tokens.shape
        rows = np.arange(batch * seq)
        wanted = np.ones(rows.size, bool) if all_logits else rows % seq == seq - 1
        logits = self._run(tokens.reshape(-1), rows // seq, start_pos + rows % seq, wanted, (batch, seq),
                           (batch, seq) if all_logits else (batch, 1), hook, hook_names)
        return logits.reshape(batch, seq, -1) if all_logits else logits

    def step(self, inputs: np.ndarray, slots: np.ndarray, positions: np.ndarray, logits: np.ndarray,
             hook: Callable | None = None, hook_names: set[str] | None = None) -> np.ndarray:
        """One ragged step (the Rust engine's `step`): `inputs` are token ids, or a later stage's hidden
        states `[rows, hidden]`; returns logits `[rows where logits, vocab]`, or a stage before the
        last the hidden states of every row."""
        logits = np.asarray(logits, dtype=bool)
        inputs = np.asarray(inputs)
        return self._run(inputs, np.asarray(slots), np.asarray(positions), logits,
                         (1, len(inputs)), (1, int(logits.sum())), hook, hook_names)

    def _runs(self, inputs, slots, positions, wanted) -> list[tuple[int, int, int, int]]:
        """Check a batch and split it into (slot, first row, end row, first position) runs."""
        a, n = self.args, len(inputs)
        hidden = inputs.ndim == 2
        if hidden == self.stage.embeds:
            raise ValueError("this model embeds token ids itself: give it token ids" if self.stage.embeds else
                             f"this pipeline stage starts at layer {self.stage.first}: it takes hidden states, "
                             "not token ids")
        if hidden and inputs.shape[1] != a.hidden_size:
            raise ValueError(f"hidden states must be [rows, {a.hidden_size}], got {list(inputs.shape)}")
        check_row_counts(n, slots, positions, wanted)
        if not hidden:
            check_token_ids(inputs, a.vocab_size)
        return slot_runs(slots, positions, self.filled, a.max_seq_len)

    def _run(self, tokens, slots, positions, wanted, lead, logits_lead, hook, hook_names) -> np.ndarray:
        """A step that fails (a hook's exception, KeyboardInterrupt) leaves the cache as it was."""
        runs = self._runs(tokens, slots, positions, wanted)
        self.check_loaded()
        saved = [(slot, pos, pos + end - first, self.cache_k[:, slot, :, pos:pos + end - first].copy(),
                  self.cache_v[:, slot, :, pos:pos + end - first].copy()) for slot, first, end, pos in runs]
        filled = list(self.filled)
        try:
            return self._decode(tokens, positions, wanted, runs, lead, logits_lead, hook, hook_names)
        except BaseException:
            self.filled = filled
            for slot, start, end, keys, values in saved:
                self.cache_k[:, slot, :, start:end], self.cache_v[:, slot, :, start:end] = keys, values
            raise

    def _decode(self, inputs, positions, wanted, runs, lead, logits_lead, hook, hook_names):
        a, w = self.args, self.weights

        def emit(name: str, layer: int, x: np.ndarray, inner: tuple[int, ...], shape=lead) -> None:
            if hook is not None and hook_names and name in hook_names:
                hook(name, np.array(x, dtype=np.float32).reshape(shape[0], -1, *inner), layer)

        if self.stage.embeds:
            x = w["model.embed_tokens.weight"][inputs]  # [rows, hidden]
            emit(H.EMBED_TOKENS, -1, x, (a.hidden_size,))
        else:
            x = inputs.astype(np.float32)
        cos, sin = K.rope_cos_sin(positions, self.inv_freq)
        for layer in range(self.stage.num_layers):
            x = self._layer(layer, x, runs, cos, sin, emit)
        if not self.stage.heads:
            return x

        x = K.rms_norm(x, w["model.norm.weight"], a.rms_norm_eps)
        emit(H.FINAL_NORM, -1, x, (a.hidden_size,))
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        logits = K.linear(x[wanted], head)
        emit(H.LOGITS, -1, logits, (a.vocab_size,), logits_lead)
        return logits

    def _layer(self, i, x, runs, cos, sin, emit):
        a, d = self.args, self.head_dim
        p = f"model.layers.{i}."
        w = lambda name: self.weights[p + name]  # noqa: E731
        bias = lambda name: self.weights.get(p + name)  # noqa: E731
        layer = i + self.stage.first  # the model's index, which hook names use
        n = lambda point: H.layer_point(layer, point)  # noqa: E731
        h = a.hidden_size

        # Attention block.
        xn = K.rms_norm(x, w("input_layernorm.weight"), a.rms_norm_eps)
        emit(n(H.INPUT_LAYERNORM), layer, xn, (h,))
        q = K.linear(xn, w("self_attn.q_proj.weight"), bias("self_attn.q_proj.bias"))
        k = K.linear(xn, w("self_attn.k_proj.weight"), bias("self_attn.k_proj.bias"))
        v = K.linear(xn, w("self_attn.v_proj.weight"), bias("self_attn.v_proj.bias"))
        q = q.reshape(-1, a.num_attention_heads, d)
        k = k.reshape(-1, a.num_key_value_heads, d)
        v = v.reshape(-1, a.num_key_value_heads, d)
        emit(n(H.Q_AFTER_PROJ), layer, q, (a.num_attention_heads, d))
        emit(n(H.K_AFTER_PROJ), layer, k, (a.num_key_value_heads, d))
        emit(n(H.V_AFTER_PROJ), layer, v, (a.num_key_value_heads, d))
        if a.qk_norm:  # Qwen3: each head of q and k normalized on its own, before rope
            q = K.rms_norm(q, w("self_attn.q_norm.weight"), a.rms_norm_eps)
            k = K.rms_norm(k, w("self_attn.k_norm.weight"), a.rms_norm_eps)
        q, k = K.rotate_half(q, cos, sin), K.rotate_half(k, cos, sin)
        emit(n(H.Q_AFTER_ROPE), layer, q, (a.num_attention_heads, d))
        emit(n(H.K_AFTER_ROPE), layer, k, (a.num_key_value_heads, d))

        context = np.empty((len(x), a.q_dim()), dtype=np.float32)
        for slot, first, end, pos in runs:  # each sequence attends to its own slot
            last = pos + end - first
            self.cache_k[i, slot, :, pos:last] = k[first:end].transpose(1, 0, 2)
            self.cache_v[i, slot, :, pos:last] = v[first:end].transpose(1, 0, 2)
            self.filled[slot] = max(self.filled[slot], last)
            context[first:end] = K.attention(
                q[first:end], self.cache_k[i, slot, :, :last].transpose(1, 0, 2).astype(np.float32, copy=False),
                self.cache_v[i, slot, :, :last].transpose(1, 0, 2).astype(np.float32, copy=False), True, pos,
                1.0 / np.sqrt(d), self.windows[i],
            ).reshape(end - first, -1)
        emit(n(H.ATTENTION_CONTEXT), layer, context, (a.q_dim(),))
        attn_out = K.linear(context, w("self_attn.o_proj.weight"), bias("self_attn.o_proj.bias"))
        emit(n(H.ATTENTION_OUTPUT), layer, attn_out, (h,))
        x = x + attn_out
        emit(n(H.AFTER_ATTENTION_RESIDUAL), layer, x, (h,))

        # MLP block.
        xn = K.rms_norm(x, w("post_attention_layernorm.weight"), a.rms_norm_eps)
        emit(n(H.POST_ATTENTION_LAYERNORM), layer, xn, (h,))
        gate = K.linear(xn, w("mlp.gate_proj.weight"), bias("mlp.gate_proj.bias"))
        up = K.linear(xn, w("mlp.up_proj.weight"), bias("mlp.up_proj.bias"))
        emit(n(H.MLP_GATE_PROJ), layer, gate, (a.intermediate_size,))
        emit(n(H.MLP_UP_PROJ), layer, up, (a.intermediate_size,))
        hidden = K.swiglu(gate, up)
        emit(n(H.MLP_INTERMEDIATE), layer, hidden, (a.intermediate_size,))
        mlp_out = K.linear(hidden, w("mlp.down_proj.weight"), bias("mlp.down_proj.bias"))
        emit(n(H.MLP_OUTPUT), layer, mlp_out, (h,))
        x = x + mlp_out
        emit(n(H.OUTPUT), layer, x, (h,))
        return x
