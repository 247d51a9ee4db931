"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, any resolution) with pruning.

An image is a base crop plus a grid of tiles, unpadded, with one `image_newline`
token per row: N = base + tiles + rows tokens, depending on the image's size. The budget
is per image, over all N tokens (newlines included: they are candidates like any other
token, and, all being the same vector, a diversity-seeking selection keeps at most one
of them); K = min(budget, N) by the same `kept_count` as every architecture. The
papers' 88.9% setting (320 of 2880 at 672x672) is `budget: 320`.

Only the LLM-space methods (script, gsp, qcsp, divprune, uniform) with relevance "llm"
are available here: they select among the rows vLLM's own `embed_multimodal` returns.
"""

from __future__ import annotations

from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_script.models.common import ScriptModelMixin, ScriptProcessorMixin
from vllm_script.models.llava import LlavaFamilyProcessorMixin


class ScriptLlavaNextProcessor(
    LlavaFamilyProcessorMixin, ScriptProcessorMixin, LlavaNextMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ScriptLlavaNextProcessor,
    info=LlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ScriptLlavaNextForConditionalGeneration(ScriptModelMixin, LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.script_init(vllm_config)
