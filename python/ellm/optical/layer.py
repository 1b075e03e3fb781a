"""OpticalLinear: a linear layer as a photonic chip computes it, on the fused optical kernel.

Forward (`ellm.ops.optical_linear`): DAC (clip x to [0, 1], quantize), the optical product,
in training mode (or with noisy=True) thermal drift and shot plus thermal noise, attenuation,
ADC (clip to [0, 1], quantize), then the digital bias. Backward: a straight-through estimator.
"""

from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..numpy_backend.kernels import GOLDEN_GAMMA, MASK64, splitmix_mix
from .profiles import DEFAULT_PROFILE, HardwareProfile, resolve_profile


def call_seed(seed: int, call: int) -> int:
    """The noise seed of a layer's `call`-th noisy forward (SplitMix64 of the pair)."""
    return splitmix_mix((seed + (call + 1) * GOLDEN_GAMMA) & MASK64)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return seed


def check_features(in_features, out_features) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def initial_parameters(in_features: int, out_features: int, bias: bool, seed: int):
    """(weight, bias or None) of a layer seeded with `seed`: torch.nn.Linear's init (Kaiming-uniform
    with a = sqrt(5), so bound 1/sqrt(fan_in), and the same bound for the bias) drawn from NumPy."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(in_features)
    weight = rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32)
    return weight, (rng.uniform(-bound, bound, out_features).astype(np.float32) if bias else None)


class OpticalLinear:
    def __init__(self, in_features: int, out_features: int, hardware_profile: str | HardwareProfile = DEFAULT_PROFILE,
                 precision: int | None = None, noise_level: float | None = None, temp_drift: float | None = None,
                 bias: bool = False, seed: int | None = None) -> None:
        check_features(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.profile = resolve_profile(hardware_profile, precision=precision, noise_level=noise_level,
                                       temp_drift=temp_drift)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy) & MASK64
        self.seed = check_seed(seed)
        self.weight, self.bias = initial_parameters(in_features, out_features, bias, seed)
        self.training = True
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self._calls = 0
        self._saved: tuple[np.ndarray, np.ndarray] | None = None

    def train(self, mode: bool = True) -> OpticalLinear:
        self.training = bool(mode)
        return self

    def eval(self) -> OpticalLinear:
        return self.train(False)

    def __call__(self, x, noisy: bool | None = None) -> np.ndarray:
        return self.forward(x, noisy)

    def forward(self, x, noisy: bool | None = None) -> np.ndarray:
        """y for x `[..., in_features]`. Noise and drift apply in training mode, or when noisy=True."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"OpticalLinear expects x [..., {self.in_features}], got shape {x.shape}")
        noisy = self.training if noisy is None else bool(noisy)
        seed = 0
        if noisy:
            seed = call_seed(self.seed, self._calls)
            self._calls += 1
        p = self.profile
        y, mask = ops.optical_linear(x, self.weight, self.bias, precision=p.precision, noise_level=p.noise_level,
                                     temp_drift=p.temp_drift, attenuation=p.attenuation, training=noisy, seed=seed,
                                     return_mask=True)
        self._saved = (x, mask) if self.training else None
        return y

    def backward(self, grad_y) -> np.ndarray:
        """Straight-through gradients of the last training-mode forward: returns grad_x and sets
        `grad_weight` (and `grad_bias`)."""
        if self._saved is None:
            raise RuntimeError("backward needs a forward in training mode first")
        x, mask = self._saved
        grad_y = np.asarray(grad_y, dtype=np.float32)
        if grad_y.shape != mask.shape:
            raise ValueError(f"grad_y must have the output's shape {mask.shape}, got {grad_y.shape}")
        grad_x, self.grad_weight = ops.optical_linear_backward(grad_y, x, self.weight, mask,
                                                               precision=self.profile.precision,
                                                               attenuation=self.profile.attenuation)
        if self.bias is not None:
            self.grad_bias = grad_y.reshape(-1, self.out_features).sum(axis=0)
        return grad_x

    def parameters(self) -> list[np.ndarray]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def gradients(self) -> list[np.ndarray]:
        return [self.grad_weight] + ([self.grad_bias] if self.bias is not None else [])

    def __repr__(self) -> str:
        return (f"OpticalLinear({self.in_features}, {self.out_features}, profile={self.profile.name!r}, "
                f"precision={self.profile.precision}, bias={self.bias is not None})")
