"""HookRegistry: named callbacks that see a running model's intermediate tensors."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import numpy as np

HookCallback = Callable[[str, np.ndarray, int], object]

# The hook points by name, in firing order. The NumPy model's emit sites use these constants; the
# Rust engine's are in rust/model/hook_points.rs, held equal to these by a test.
EMBED_TOKENS, FINAL_NORM, LOGITS = "embed_tokens", "final_norm", "logits"
MODEL_POINTS = (EMBED_TOKENS, FINAL_NORM, LOGITS)

INPUT_LAYERNORM = "input_layernorm"
Q_AFTER_PROJ, K_AFTER_PROJ, V_AFTER_PROJ = "q_after_proj", "k_after_proj", "v_after_proj"
Q_AFTER_ROPE, K_AFTER_ROPE = "q_after_rope", "k_after_rope"
ATTENTION_CONTEXT, ATTENTION_OUTPUT = "attention_context", "attention_output"
AFTER_ATTENTION_RESIDUAL, POST_ATTENTION_LAYERNORM = "after_attention_residual", "post_attention_layernorm"
MLP_GATE_PROJ, MLP_UP_PROJ, MLP_INTERMEDIATE = "mlp_gate_proj", "mlp_up_proj", "mlp_intermediate"
MLP_OUTPUT, OUTPUT = "mlp_output", "output"
LAYER_POINTS = (
    INPUT_LAYERNORM, Q_AFTER_PROJ, K_AFTER_PROJ, V_AFTER_PROJ, Q_AFTER_ROPE, K_AFTER_ROPE, ATTENTION_CONTEXT,
    ATTENTION_OUTPUT, AFTER_ATTENTION_RESIDUAL, POST_ATTENTION_LAYERNORM, MLP_GATE_PROJ, MLP_UP_PROJ,
    MLP_INTERMEDIATE, MLP_OUTPUT, OUTPUT,
)


def layer_point(layer: int, point: str) -> str:
    """A layer's point as it fires: `layer{i}_{point}`."""
    return f"layer{layer}_{point}"


def hook_point_names(num_layers: int) -> list[str]:
    """Every point a model with `num_layers` layers fires, in the order it fires them."""
    names = [EMBED_TOKENS]
    for i in range(num_layers):
        names.extend(layer_point(i, p) for p in LAYER_POINTS)
    return names + [FINAL_NORM, LOGITS]


class HookRegistry:
    """Callbacks by name; a name may be an `fnmatch` pattern such as `layer*_attention_output`.

    A callback is called as `callback(name, tensor, layer_idx)` with the point's actual name, a
    float32 array it may keep, and the layer index (-1 outside the layers). Where several
    registered names match a point, each callback runs, in registration order.
    """

    def __init__(self) -> None:
        self._hooks: dict[str, HookCallback] = {}

    def register_hook(self, name: str, callback: HookCallback) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"hook name must be a non-empty str, got {name!r}")
        if not callable(callback):
            raise TypeError(f"hook callback for {name!r} must be callable, got {type(callback).__name__}")
        self._hooks[name] = callback

    def remove_hook(self, name: str) -> bool:
        """Remove a registered name; False when it was not registered."""
        return self._hooks.pop(name, None) is not None

    def clear(self) -> None:
        self._hooks.clear()

    def has_hooks(self) -> bool:
        return bool(self._hooks)

    def names(self) -> list[str]:
        return list(self._hooks)

    def callbacks_for(self, point: str) -> list[HookCallback]:
        return [cb for pattern, cb in self._hooks.items() if fnmatch.fnmatchcase(point, pattern)]

    def matching(self, points: Iterable[str]) -> set[str]:
        """The points at least one registered name matches."""
        return {p for p in points if any(fnmatch.fnmatchcase(p, pattern) for pattern in self._hooks)}

    def call_hook(self, name: str, tensor: np.ndarray, layer_idx: int = -1) -> None:
        for cb in self.callbacks_for(name):
            cb(name, tensor, layer_idx)

    def __repr__(self) -> str:
        return f"HookRegistry({self.names()})"
