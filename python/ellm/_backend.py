"""Which backend runs the kernels: the Rust extension or the NumPy twins.

`LUMINA_USE_RUST` unset or "1": Rust when `ellm._lowlevel` imports, else NumPy with one
BackendWarning saying why. "0": NumPy. Anything else: ValueError at first use.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from .errors import BackendUnavailableError, BackendWarning

ENV_VAR = "LUMINA_USE_RUST"
BACKENDS = ("rust", "numpy")

try:
    from . import _lowlevel as _rust
    _import_error: BaseException | None = None
except ImportError as exc:  # the extension was not built, or was hidden
    _rust = None
    _import_error = exc

_current: str | None = None


def require_rust() -> ModuleType:
    """`ellm._lowlevel`, or BackendUnavailableError saying why it is missing."""
    if _rust is None:
        raise BackendUnavailableError(f"the Rust backend is not available: {_import_error}")
    return _rust


def rust_available() -> bool:
    """True when the Rust extension `ellm._lowlevel` imported."""
    return _rust is not None


def _from_environment() -> str:
    value = os.environ.get(ENV_VAR)
    if value not in (None, "0", "1"):
        raise ValueError(f"{ENV_VAR} must be '1' (Rust, the default) or '0' (NumPy), got {value!r}")
    if value == "0":
        return "numpy"
    if _rust is None:
        warnings.warn(
            f"ellm's Rust extension could not be imported ({_import_error}); using the NumPy backend",
            BackendWarning,
            stacklevel=4,
        )
        return "numpy"
    return "rust"


def get_backend() -> str:
    """The backend in use: "rust" or "numpy"."""
    global _current
    if _current is None:
        _current = _from_environment()
    return _current


def set_backend(name: str) -> None:
    """Switch backends at run time. Models keep the backend they were built with."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "rust":
        require_rust()
    _current = name


def kernels() -> ModuleType:
    """The module implementing the kernels for the current backend (same names, same signatures)."""
    if get_backend() == "rust":
        return _rust  # type: ignore[return-value]
    from .numpy_backend import kernels as numpy_kernels

    return numpy_kernels
