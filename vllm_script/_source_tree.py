"""Use `vllm_script.kernels` from a source checkout that is not installed.

The kernels live in the top-level `kernels/` folder and are installed as
`vllm_script.kernels` (setuptools `package-dir`). On a machine where the project cannot be
installed (the lent GPU machine: torch, Triton and transformers, no vLLM), the GPU check
and the tests map that folder in place of the installed package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def map_kernels() -> bool:
    """Make `vllm_script.kernels` importable from ../kernels; True if it had to be mapped."""
    import vllm_script

    if importlib.util.find_spec("vllm_script.kernels") is not None:
        return False
    root = Path(vllm_script.__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location(
        "vllm_script.kernels", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"no kernels package at {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vllm_script.kernels"] = module
    spec.loader.exec_module(module)
    vllm_script.kernels = module
    return True
