"""HookRegistry: named callbacks that see a running model's intermediate tensors."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import numpy as np

HookCallback = Callable[[str, np.ndarray, int], object]

LAYER_POINTS = (
    "input_layernorm", "q_after_proj", "k_after_proj", "v_after_proj", "q_after_rope", "k_after_rope",
    "attention_context", "attention_output", "after_attention_residual", "post_attention_layernorm",
    "mlp_gate_proj", "mlp_up_proj", "mlp_intermediate", "mlp_output", "output",
)


def hook_point_names(num_layers: int) -> list[str]:
    """Every point a model with `num_layers` layers fires, in the order it fires them."""
    names = ["embed_tokens"]
    for i in range(num_layers):
        names.extend(f"layer{i}_{p}" for p in LAYER_POINTS)
    return names + ["final_norm", "logits"]


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
