"""Noise-aware training (NAT): train a stack of OpticalLinear layers (ReLU between them) with
the chip's noise in the forward pass and LuminaFlow's gradient noise
(`grad += randn * level * |grad|`), so the network holds up on noisy hardware."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .layer import OpticalLinear
from .profiles import DEFAULT_PROFILE, HardwareProfile

SCHEDULES = ("constant", "linear", "cosine")


def gradient_noise_level(schedule: str, max_level: float, progress: float) -> float:
    """The gradient-noise level at `progress` in [0, 1] of training."""
    if schedule == "constant":
        return max_level
    if schedule == "linear":
        return max_level * progress
    if schedule == "cosine":
        return max_level * 0.5 * (1.0 - math.cos(math.pi * progress))
    raise ValueError(f"noise schedule must be one of {SCHEDULES}, got {schedule!r}")


def _softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels] + 1e-12).mean()
    grad = p
    grad[np.arange(n), labels] -= 1.0
    return float(loss), (grad / n).astype(np.float32)


class NoiseAwareTrainer:
    """`layer_sizes` such as [64, 128, 10]. With noise_aware=False the same network trains with
    the chip's quantization but no noise (the baseline NAT is compared against)."""

    def __init__(self, layer_sizes: Sequence[int], hardware_profile: str | HardwareProfile = DEFAULT_PROFILE, *,
                 noise_aware: bool = True, optimizer: str = "adam", learning_rate: float | None = None,
                 momentum: float = 0.9, noise_schedule: str = "constant", max_noise_level: float = 0.2,
                 logit_scale: float = 10.0, seed: int = 0) -> None:
        if len(layer_sizes) < 2:
            raise ValueError(f"layer_sizes needs an input and an output size, got {list(layer_sizes)}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        gradient_noise_level(noise_schedule, max_noise_level, 0.0)
        if not 0.0 <= max_noise_level <= 1.0:
            raise ValueError(f"max_noise_level must be in [0, 1], got {max_noise_level}")
        self.layers = [OpticalLinear(a, b, hardware_profile, bias=True, seed=seed + i)
                       for i, (a, b) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:]))]
        self.noise_aware = noise_aware
        self.optimizer = optimizer
        self.learning_rate = learning_rate if learning_rate is not None else (0.001 if optimizer == "adam" else 0.02)
        self.momentum = momentum
        self.noise_schedule = noise_schedule
        self.max_noise_level = max_noise_level
        # The ADC limits outputs to [0, 1]; the digital side scales the last layer into logits.
        self.logit_scale = logit_scale
        self.rng = np.random.default_rng(seed)
        self._state = [[np.zeros_like(p) for p in layer.parameters()] for layer in self.layers]
        self._state2 = [[np.zeros_like(p) for p in layer.parameters()] for layer in self.layers]
        self._steps = 0

    # ----- forward and backward -----

    def forward(self, x: np.ndarray, noisy: bool) -> np.ndarray:
        h = np.asarray(x, dtype=np.float32)
        self._relu_masks = []
        for i, layer in enumerate(self.layers):
            h = layer(h, noisy=noisy)
            if i < len(self.layers) - 1:
                mask = h > 0
                self._relu_masks.append(mask)
                h = h * mask
        return h * np.float32(self.logit_scale)

    def forward_backward(self, x: np.ndarray, y: np.ndarray) -> float:
        """Loss and gradients of a batch: the forward pass (with the chip's noise when
        noise-aware) and the straight-through backward. Returns the loss."""
        for layer in self.layers:
            layer.train()
        logits = self.forward(x, noisy=self.noise_aware)
        loss, grad = _softmax_cross_entropy(logits, np.asarray(y))
        grad = grad * np.float32(self.logit_scale)
        for i in range(len(self.layers) - 1, -1, -1):
            grad = self.layers[i].backward(grad)
            if i > 0:
                grad = grad * self._relu_masks[i - 1]
        return loss

    def step(self, x: np.ndarray, y: np.ndarray, progress: float = 0.0) -> float:
        """One training step: forward_backward, gradient noise, optimizer update. Returns the loss."""
        loss = self.forward_backward(x, y)
        level = gradient_noise_level(self.noise_schedule, self.max_noise_level, progress) if self.noise_aware else 0.0
        self._update(level)
        return loss

    def _update(self, level: float) -> None:
        self._steps += 1
        lr, t = self.learning_rate, self._steps
        for layer, m_state, v_state in zip(self.layers, self._state, self._state2):
            for param, grad, m, v in zip(layer.parameters(), layer.gradients(), m_state, v_state):
                if level > 0:
                    grad = grad + self.rng.standard_normal(grad.shape).astype(np.float32) * np.float32(level) * np.abs(grad)
                if self.optimizer == "sgd":
                    m *= self.momentum
                    m += grad
                    param -= np.float32(lr) * m
                else:
                    m *= 0.9
                    m += 0.1 * grad
                    v *= 0.999
                    v += 0.001 * grad * grad
                    m_hat = m / (1 - 0.9**t)
                    v_hat = v / (1 - 0.999**t)
                    param -= (lr * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(np.float32)

    # ----- the public loop -----

    def fit(self, X, y, epochs: int = 10, batch_size: int = 32) -> list[float]:
        """Train for `epochs` passes over (X, y) in shuffled mini-batches; returns each epoch's mean loss."""
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
        if X.ndim != 2 or X.shape[1] != self.layers[0].in_features or len(X) != len(y):
            raise ValueError(f"fit expects X [n, {self.layers[0].in_features}] and y [n], got {X.shape} and {y.shape}")
        if epochs <= 0 or batch_size <= 0:
            raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
        history = []
        for epoch in range(epochs):
            order = self.rng.permutation(len(X))
            losses = [self.step(X[idx], y[idx], progress=(epoch + 1) / epochs)
                      for idx in np.array_split(order, max(1, len(X) // batch_size))]
            history.append(float(np.mean(losses)))
        return history

    def predict(self, X, noisy: bool = False) -> np.ndarray:
        for layer in self.layers:
            layer.eval()
        return np.argmax(self.forward(np.asarray(X, dtype=np.float32), noisy=noisy), axis=1)

    def evaluate(self, X, y, noisy: bool = True, trials: int = 5) -> dict[str, float | None]:
        """Clean accuracy, accuracy under the hardware noise (mean of `trials` noise draws; None
        with noisy=False) and robustness (noisy / clean)."""
        y = np.asarray(y)
        clean = float(np.mean(self.predict(X) == y))
        if not noisy:
            return {"clean_accuracy": clean, "noisy_accuracy": None, "robustness": None}
        noisy_acc = float(np.mean([np.mean(self.predict(X, noisy=True) == y) for _ in range(trials)]))
        return {"clean_accuracy": clean, "noisy_accuracy": noisy_acc, "robustness": noisy_acc / clean if clean else 0.0}
