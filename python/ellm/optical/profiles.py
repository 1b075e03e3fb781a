"""Hardware profiles of photonic accelerators (LuminaFlow SDK's table)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..ops import check_bits


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    noise_level: float   # shot noise: std of the relative noise, N(0, noise_level^2 * |s|)
    precision: int       # DAC/ADC bits
    temp_drift: float    # thermal drift strength
    attenuation: float   # optical power reaching the detectors

    def validate(self) -> HardwareProfile:
        check_bits(self.precision, "precision")
        for field in ("noise_level", "temp_drift"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} must be in [0, 1], got {value!r}")
        if not isinstance(self.attenuation, (int, float)) or not math.isfinite(self.attenuation):
            raise ValueError(f"attenuation must be a finite number, got {self.attenuation!r}")
        return self


PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (
    HardwareProfile("lumina_nano_v1", 0.15, 4, 0.05, 0.85),
    HardwareProfile("lumina_micro_v1", 0.10, 8, 0.03, 0.90),
    HardwareProfile("edge_ultra_low_power", 0.20, 2, 0.10, 0.75),
    HardwareProfile("datacenter_high_precision", 0.05, 12, 0.01, 0.95),
    HardwareProfile("custom", 0.10, 8, 0.0, 1.0),
)}
DEFAULT_PROFILE = "lumina_nano_v1"


def resolve_profile(profile: str | HardwareProfile = DEFAULT_PROFILE, *, precision: int | None = None,
                    noise_level: float | None = None, temp_drift: float | None = None) -> HardwareProfile:
    """A profile by name (or as given), with explicit arguments overriding its values."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown hardware profile {profile!r}; known profiles: {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    elif not isinstance(profile, HardwareProfile):
        raise TypeError(f"hardware_profile must be a profile name or a HardwareProfile, got {type(profile).__name__}")
    overrides = {k: v for k, v in (("precision", precision), ("noise_level", noise_level), ("temp_drift", temp_drift))
                 if v is not None}
    return replace(profile, **overrides).validate()
