"""LLaVA-1.5 (`LlavaForConditionalGeneration`) with visual-token pruning.

Model side: the vision tower runs as in vLLM (`_image_pixels_to_features`: the selected
layer, `vision_feature_layer`, -2 for LLaVA-1.5; CLS dropped by the "default" strategy),
giving N pre-projector patch features per image. Then, per item:

- LLM-space methods (script, gsp, qcsp, divprune, uniform) select among the projected
  tokens `multi_modal_projector(features)`.
- TRIM and PruMerge+ select / merge / aggregate the pre-projector features; the resulting
  rows (kept, merged and extra tokens) go through the projector.
- CLIP relevance (`relevance="clip"`, needs a CLIP vision tower and the server's
  `clip_path`): `visual_projection(post_layernorm(features))` with the CLIP checkpoint's
  post-layernorm and projection (LLaVA-1.5's features are CLIP's penultimate layer, the
  papers' choice) against the CLIP text embedding of the question.
- PruMerge+'s CLS attention: vLLM's attention returns no weights, so q / k are taken
  from the last layer vLLM builds for LLaVA (the selected layer, i.e. CLIP's penultimate
  layer for LLaVA-1.5) by a forward hook on that layer's `qkv_proj`, registered only
  for the call that encodes a PruMerge+ batch; CLS attention = softmax over all keys of
  the CLS query (one full-width head, as the authors' code), CLS column dropped. The
  authors' code hooks the layer after the features (CLIP's true last layer), which vLLM
  does not load for LLaVA; using the selected layer keeps the keys and the features
  from the same layer (the keys merged by similarity are that layer's patch keys).
  Grid for PruMerge+'s uniform top-up and `uniform`: (sqrt(N), sqrt(N)).
"""

from __future__ import annotations

import torch
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

from vllm_script.config import SettingsError, kept_count
from vllm_script.models.common import (
    PassThroughProcessorMixin,
    ScriptModelMixin,
    ScriptProcessorMixin,
    settings_from_kwargs,
)
from vllm_script.pruning import ImageInput, square_grid


def clip_vision_width(hf_config) -> int:
    """The vision tower's width, if CLIP relevance can use its features (else raise)."""
    vision = hf_config.vision_config
    if getattr(vision, "model_type", None) != "clip_vision_model":
        raise NotImplementedError(
            f"relevance='clip' needs a CLIP vision tower; this model's is "
            f"{getattr(vision, 'model_type', type(vision).__name__)!r}"
        )
    if not isinstance(hf_config.vision_feature_layer, int):
        raise NotImplementedError(
            "relevance='clip' needs one vision feature layer; this model concatenates "
            f"layers {hf_config.vision_feature_layer}"
        )
    return vision.hidden_size


class LlavaFamilyProcessorMixin:
    """Placeholders, per-item fields and the count rule for LLaVA-style processors
    (one `<image>` token repeated per visual token; also LLaVA-NeXT's)."""

    def script_placeholder_ids(self):
        return [self.info.get_hf_config().image_token_index]

    def script_num_items(self, hf_outputs, modality: str) -> int:
        return len(hf_outputs["pixel_values"]) if modality == "image" else 0

    def script_num_tokens(self, mm_items, modality: str, item_idx: int) -> int | None:
        images = mm_items.get("image")
        if modality != "image" or not isinstance(images, ImageProcessorItems):
            return None
        size = images.get_image_size(item_idx)
        return self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)

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

        return [
            PromptReplacement(
                modality="image", target=[image_token_id], replacement=get_replacement
            )
        ]


class ScriptLlavaProcessor(
    LlavaFamilyProcessorMixin, ScriptProcessorMixin, LlavaMultiModalProcessor
):
    script_vision_space = True

    def script_clip_vision_width(self) -> int:
        return clip_vision_width(self.info.get_hf_config())

    def script_check_supported(self, settings, where: str) -> None:
        super().script_check_supported(settings, where)
        vision = self.info.get_hf_config().vision_config
        if (
            settings is not None
            and settings.method == "prumerge+"
            and (getattr(vision, "model_type", None) != "clip_vision_model")
        ):  # PruMerge+ reads the CLS token's attention: CLIP towers have one, SigLIP not
            raise SettingsError(
                f"{where}: invalid value for 'script.method': 'prumerge+'; it needs a CLIP "
                f"vision tower (with a CLS token), this model's is {vision.model_type!r}"
            )


class PassThroughPixtralHFProcessor(PassThroughProcessorMixin, PixtralHFMultiModalProcessor):
    """Pixtral-HF checkpoints (same architecture name): not pruned; per-request kwargs
    follow the server's `request_kwargs` rule like every architecture the plugin serves."""


def _build_processor(info, dummy_inputs):
    if isinstance(info, PixtralHFProcessingInfo):  # Pixtral-HF: not pruned
        return PassThroughPixtralHFProcessor(info, dummy_inputs)
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
        self.script_init(vllm_config)

    def script_clip_vision_width(self) -> int:
        return clip_vision_width(self.config)

    def script_project(self, features: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(features)

    def script_encode(self, kwargs: dict, settings: list) -> list[ImageInput] | None:
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None or image_input["type"] != "pixel_values":
            return None
        need_qk = any(cfg is not None and cfg.method == "prumerge+" for cfg in settings)
        captured: list[torch.Tensor] = []
        handle = None
        attn = None
        if need_qk:
            attn = self.vision_tower.vision_model.encoder.layers[-1].self_attn

            def keep_qkv(_module, _inputs, output):
                captured.append(output[0] if isinstance(output, tuple) else output)

            handle = attn.qkv_proj.register_forward_hook(keep_qkv)
        try:
            features = self._image_pixels_to_features(
                self.vision_tower, image_input["pixel_values"]
            )
        finally:
            if handle is not None:
                handle.remove()
        if not isinstance(features, torch.Tensor):
            features = torch.stack(list(features))
        grid = square_grid(features.shape[1])
        queries = keys = None
        if need_qk:
            if len(captured) != 1:
                raise RuntimeError(
                    f"vllm-script: expected one qkv projection of the last vision layer, "
                    f"saw {len(captured)}"
                )
            queries, keys = captured[0].chunk(3, dim=-1)[:2]
            if getattr(attn, "tp_size", 1) > 1:  # heads sharded: gather the full width
                from vllm.distributed import tensor_model_parallel_all_gather

                queries = tensor_model_parallel_all_gather(queries.contiguous())
                keys = tensor_model_parallel_all_gather(keys.contiguous())
        return [
            ImageInput(
                features=features[b],
                cls_query=None if queries is None else queries[b, 0],
                layer_keys=None if keys is None else keys[b],
                grid=grid,
            )
            for b in range(features.shape[0])
        ]
