"""ellm: Llama-family language models, optical layer simulation and model cost estimates on the
CPU, with a Rust core and a pure-NumPy fallback."""

from __future__ import annotations

from . import ops
from ._backend import get_backend, rust_available, set_backend
from .errors import BackendUnavailableError, BackendWarning, EllmError, ModelFormatError

__version__ = "0.1.0"

__all__ = [
    "ops", "get_backend", "set_backend", "rust_available", "__version__",
    "EllmError", "BackendWarning", "BackendUnavailableError", "ModelFormatError",
    "ModelArgs", "Transformer", "Llama", "Tokenizer", "HookRegistry", "metadata", "optical",
]


_SUBPACKAGES = ("metadata", "optical")


def __getattr__(name: str):
    # The model, text and hook APIs import lazily, so `import ellm` stays fast for ops users.
    if name == "ModelArgs":
        from .config import ModelArgs
        return ModelArgs
    if name == "Transformer":
        from .model import Transformer
        return Transformer
    if name == "Llama":
        from .generation import Llama
        return Llama
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    if name == "HookRegistry":
        from .hooks import HookRegistry
        return HookRegistry
    if name in _SUBPACKAGES:  # `ellm.metadata.generate_metadata(...)` after a bare `import ellm`
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ellm' has no attribute {name!r}")
