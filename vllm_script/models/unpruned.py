"""Multimodal architectures vllm-script does not prune: vLLM's own model, and one line.

`register()` (vllm_script.plugin) cannot see the served model: it runs in every process
before the model is known. The one place the plugin's code meets the served architecture
is the model class vLLM builds for it. So the plugin points each multimodal architecture
of vLLM's registry that it does not prune at this module ("vllm_script.models.unpruned:
<Arch>"), and the class made here for it is vLLM's in-tree class unchanged but for one
thing: when the model is built at start-up, the first rank logs once that pruning is off
for it and why (a warning if the server set a `script` setting, which is then ignored).
Processor, weights, forward and outputs are the in-tree ones: the model works unpruned.
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger("vllm_script")

MROPE = (
    "its LLM uses M-RoPE (multi-axis) positions, so kept tokens must keep their original "
    "positions: that needs an adapter of its own (vllm-script has Qwen2.5-VL's and Qwen3-VL's)"
)
UNCHECKED = (
    "it is not in vllm-script's table of checked architectures (README, 'Architectures'); "
    "a 1-D-position model whose image is one run of embedding tokens becomes supported "
    "by a row in vllm_script/models/generic.py and its tests"
)
# Refusals that need more words than the two above.
REASONS = {
    "Mistral3ForConditionalGeneration": (
        "its images are one run of tokens per row separated by [IMG_BREAK] text tokens, "
        "which cannot stay in place once rows are pruned; not checked yet"
    ),
    "PixtralForConditionalGeneration": (
        "its images are one run of tokens per row separated by [IMG_BREAK] text tokens, "
        "which cannot stay in place once rows are pruned; not checked yet"
    ),
    "Idefics3ForConditionalGeneration": (
        "an image is split into tiles, each introduced by its own text tokens, so its "
        "visual tokens are several runs that cannot keep their text in place when pruned"
    ),
    "SmolVLMForConditionalGeneration": (
        "an image is split into tiles, each introduced by its own text tokens, so its "
        "visual tokens are several runs that cannot keep their text in place when pruned"
    ),
}

_announced: set[str] = set()


def reason_for(arch: str, model_cls: type) -> str:
    """Why vllm-script does not prune `arch` (served by vLLM's `model_cls`)."""
    if arch in REASONS:
        return REASONS[arch]
    if getattr(model_cls, "supports_mrope", False):
        return MROPE
    return UNCHECKED


def _first_rank() -> bool:
    try:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0 and get_pp_group().is_first_rank
    except (AssertionError, ImportError, RuntimeError):  # no distributed state: one process
        return True


def announce(arch: str, reason: str, hf_config: object) -> None:
    """Log once per process (first rank only) that pruning is off for `arch`, and why."""
    if arch in _announced or not _first_rank():
        return
    _announced.add(arch)
    if getattr(hf_config, "script", None) is not None:
        logger.warning(
            "vllm-script: pruning is off for %s, so the server's 'script' setting is ignored: %s",
            arch,
            reason,
        )
    else:
        logger.info("vllm-script: pruning is off for %s: %s", arch, reason)


def make_unpruned_class(arch: str, module: str, class_name: str) -> type:
    """vLLM's in-tree class `module:class_name` for `arch`, announcing at construction."""
    base = getattr(importlib.import_module(module), class_name)
    reason = reason_for(arch, base)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        announce(arch, reason, vllm_config.model_config.hf_config)

    namespace = {
        "__init__": __init__,
        "__module__": __name__,
        "__qualname__": arch,
        "__doc__": f"vLLM's {class_name}, not pruned by vllm-script: {reason}.",
        "script_unpruned_reason": reason,
    }
    return type(arch, (base,), namespace)


_classes: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """The pass-through class for the architecture `name` (see the module doc)."""
    from vllm_script import plugin

    plugin.register()
    if name not in plugin.UNPRUNED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _classes:
        _classes[name] = make_unpruned_class(name, *plugin.UNPRUNED[name])
    return _classes[name]
