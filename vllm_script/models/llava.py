"""LLaVA-1.5 (`LlavaForConditionalGeneration`) with visual-token pruning."""

from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
    _build_llava_or_pixtral_hf_info,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vllm_script.config import kept_count
from vllm_script.models.common import (
    ScriptModelMixin,
    ScriptProcessorMixin,
    settings_from_kwargs,
)


class ScriptLlavaProcessor(ScriptProcessorMixin, LlavaMultiModalProcessor):
    def script_placeholder_ids(self):
        return [self.info.get_hf_config().image_token_index]

    def script_num_items(self, hf_outputs) -> int:
        return len(hf_outputs["pixel_values"])

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields.update(self.script_fields_config())
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = settings_from_kwargs(hf_processor_mm_kwargs)
        images = mm_items.get("image")
        if settings is None or not isinstance(images, ImageProcessorItems):
            return updates  # precomputed image embeddings are passed through unpruned
        image_token_id = self.info.get_hf_config().image_token_index

        def get_replacement(item_idx: int):
            size = images.get_image_size(item_idx)
            n = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            return [image_token_id] * kept_count(n, settings)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=get_replacement)]


def _build_processor(info, dummy_inputs):
    if isinstance(info, PixtralHFProcessingInfo):  # Pixtral-HF: not pruned, in-tree processor
        return PixtralHFMultiModalProcessor(info, dummy_inputs)
    if isinstance(info, LlavaProcessingInfo):
        return ScriptLlavaProcessor(info, dummy_inputs)
    raise NotImplementedError(type(info))


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor,
    info=_build_llava_or_pixtral_hf_info,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ScriptLlavaForConditionalGeneration(ScriptModelMixin, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.script_init(vllm_config.model_config.hf_config)
