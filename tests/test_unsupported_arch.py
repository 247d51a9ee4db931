"""Architectures vllm-script does not prune: vLLM's model unchanged, and one start-up line
saying that pruning is off and why (vllm_script.models.unpruned)."""

from __future__ import annotations

import logging

import pytest
from engine_utils import ENGINE_KWARGS, answers, run_in_fresh_engine

from vllm_script import plugin
from vllm_script.models import unpruned

QWEN2_VL = "Qwen2VLForConditionalGeneration"


@pytest.fixture(scope="module")
def registry():
    from vllm import ModelRegistry

    plugin.register()
    return ModelRegistry


@pytest.mark.parametrize(
    "arch", [QWEN2_VL, "Mistral3ForConditionalGeneration", "PaliGemmaForConditionalGeneration"]
)
def test_other_multimodal_architectures_get_vllms_class_plus_one_line(registry, arch):
    entry = registry.models[arch]
    assert (entry.module_name, entry.class_name) == (plugin.UNPRUNED_MODULE, arch)
    cls = registry._try_load_model_cls(arch)
    (base,) = cls.__bases__
    assert base.__module__.startswith("vllm.model_executor.models.")
    assert (base.__module__, base.__name__) == plugin.UNPRUNED[arch]
    # nothing else changes (the rest of vars() is what ABCMeta / Protocol add to any class)
    machinery = {"_abc_impl", "_is_protocol"}
    added = {k for k in vars(cls) if k == "__init__" or not k.startswith("__")} - machinery
    assert added == {"__init__", "script_unpruned_reason"}


def test_supported_and_text_only_architectures_are_not_redirected(registry):
    for arch, target in plugin.ARCHITECTURES.items():
        entry = registry.models[arch]
        assert f"{entry.module_name}:{entry.class_name}" == target
    assert registry.models["LlamaForCausalLM"].module_name.startswith("vllm.")


def test_reasons():
    from vllm.model_executor.models.paligemma import PaliGemmaForConditionalGeneration
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

    assert "M-RoPE" in unpruned.reason_for(QWEN2_VL, Qwen2VLForConditionalGeneration)
    assert "[IMG_BREAK]" in unpruned.reason_for("Mistral3ForConditionalGeneration", object)
    paligemma = unpruned.reason_for(
        "PaliGemmaForConditionalGeneration", PaliGemmaForConditionalGeneration
    )
    assert paligemma == unpruned.UNCHECKED and "generic.py" in paligemma


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize(("configured", "level"), [(True, "WARNING"), (False, "INFO")])
def test_announced_once_per_architecture(monkeypatch, configured, level):
    monkeypatch.setattr(unpruned, "_announced", set())
    lines = _Lines()
    logger = logging.getLogger("vllm_script")
    logger.addHandler(lines)
    monkeypatch.setattr(logger, "level", logging.DEBUG)
    config = type("Config", (), {"script": {"budget": 8} if configured else None})()
    try:
        for _ in range(3):
            unpruned.announce("SomeArch", "a reason", config)
    finally:
        logger.removeHandler(lines)
    assert [r.levelname for r in lines.records] == [level]  # once, at this level
    message = lines.records[0].getMessage()
    assert "pruning is off for SomeArch" in message and message.endswith("a reason")
    assert ("'script' setting is ignored" in message) == configured


@pytest.mark.e2e
def test_unsupported_model_serves_as_vanilla_and_says_so_once(tiny_qwen2_vl):
    requests = [
        {"template": "qwen", "question": "what is in the image?", "images": [[1, 224, 224]]},
        {"template": "qwen", "question": "how many?", "images": [[2, 300, 180], [3, 112, 112]]},
    ]
    engine = {**ENGINE_KWARGS, "hf_overrides": {"script": {"budget": 8}}}
    logs: list[str] = []
    ours = run_in_fresh_engine(tiny_qwen2_vl, requests, engine_kwargs=engine, output=logs)
    vanilla = run_in_fresh_engine(tiny_qwen2_vl, requests, plugins=False)
    assert answers(ours) == answers(vanilla)
    assert min(r["prompt_len"] for r in ours) > 8 + 20  # nothing was pruned
    text = "".join(logs)
    line = f"vllm-script: pruning is off for {QWEN2_VL}, so the server's 'script' setting"
    assert text.count(line) == 1, text[-3000:]
    assert "M-RoPE" in text.split(line, 1)[1].splitlines()[0]
