"""Photonic (optical) linear layers: hardware profiles, OpticalLinear on the fused Xoshiro256++
kernel, and noise-aware training."""

from .layer import OpticalLinear
from .profiles import DEFAULT_PROFILE, PROFILES, HardwareProfile, resolve_profile
from .training import NoiseAwareTrainer, gradient_noise_level

__all__ = ["OpticalLinear", "HardwareProfile", "PROFILES", "DEFAULT_PROFILE", "resolve_profile",
           "NoiseAwareTrainer", "gradient_noise_level"]
