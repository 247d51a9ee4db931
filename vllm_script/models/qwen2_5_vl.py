"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): images and video, M-RoPE kept.

Count rule: an image or a video is one item of N = T*H*W LLM tokens (after the 2x2
merge; T = 1 for an image, frames / 2 for a video). The budget is per item: a video's
frames are pooled and the method picks K = min(budget, N) tokens over all of them, so
it may keep more from a busy frame than from a static one. Only the LLM-space methods
(script, gsp, qcsp, divprune, uniform) with relevance "llm" are available.

Positions: kept tokens keep their original M-RoPE positions (t, h, w), and the text
after an item keeps the positions it has without pruning; how they reach the LLM on the
GPU and on the CPU model runner: `vllm_script.models.qwen_vl`.
"""

from __future__ import annotations

from functools import partial

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems, VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vllm_script.config import kept_count
from vllm_script.models.common import (
    ScriptModelMixin,
    ScriptProcessorMixin,
    settings_from_kwargs,
)
from vllm_script.models.mrope import MediaSpan, encode_offsets, kept_offsets
from vllm_script.models.qwen_vl import QwenModelMixin, QwenProcessorMixin, feature_settings

# rotary table rows per max_position_embeddings (vLLM's get_rope default for M-RoPE)
ROTARY_FACTOR = 4


def _t_factor(seconds: object, tokens_per_second: float) -> float:
    return 1.0 if seconds is None else float(seconds) * tokens_per_second


class ScriptQwen2_5_VLProcessor(
    QwenProcessorMixin, ScriptProcessorMixin, Qwen2_5_VLMultiModalProcessor
):
    def script_position_limit(self) -> int:
        text = self.info.get_hf_config().text_config
        return text.max_position_embeddings * ROTARY_FACTOR

    def script_spans(self, prompt_ids, placeholders, grids):
        cfg = self.info.get_hf_config()
        merge = cfg.vision_config.spatial_merge_size
        tokens_per_second = getattr(cfg.vision_config, "tokens_per_second", 1.0)
        spans = []
        for modality, ranges in placeholders.items():
            for r, known in zip(ranges, grids[modality], strict=True):
                if known is None:
                    return None
                (t, h, w), seconds = known
                t_factor = _t_factor(seconds if modality == "video" else None, tokens_per_second)
                grid = (t, h // merge, w // merge)
                spans.append(MediaSpan(r.offset, grid, t_factor, kept=r.length))
        return spans

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        settings = settings_from_kwargs(hf_processor_mm_kwargs)
        if settings is None and self.script_user_evs:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        image_processor = self.info.get_image_processor(**hf_processor_mm_kwargs)
        vocab = self.info.get_tokenizer().get_vocab()
        placeholder = {
            "image": vocab[hf_processor.image_token],
            "video": vocab[hf_processor.video_token],
        }
        merge_length = image_processor.merge_size**2
        processed = {"image": ImageProcessorItems, "video": VideoProcessorItems}

        def get_replacement(item_idx: int, modality: str):
            grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            n = int(grid.prod()) // merge_length
            # precomputed embeddings carry no settings field: never pruned
            pruned = isinstance(mm_items.get(modality), processed[modality])
            return [placeholder[modality]] * (kept_count(n, settings) if pruned else n)

        return [
            PromptReplacement(
                modality=modality,
                target=[placeholder[modality]],
                replacement=partial(get_replacement, modality=modality),
            )
            for modality in ("image", "video")
        ]


@MULTIMODAL_REGISTRY.register_processor(
    ScriptQwen2_5_VLProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class ScriptQwen2_5_VLForConditionalGeneration(
    QwenModelMixin, ScriptModelMixin, Qwen2_5_VLForConditionalGeneration
):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hidden = vllm_config.model_config.hf_config.text_config.hidden_size
        self.script_qwen_init(vllm_config, hidden)

    def script_spans(self, input_tokens, mm_features) -> list[MediaSpan]:
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        spans = []
        for feature, (offset, t, h, w, t_factor) in zip(
            features, self.iter_mm_grid_thw(mm_features), strict=True
        ):
            kept = kept_count(t * h * w, feature_settings(feature))
            spans.append(MediaSpan(offset, (t, h, w), t_factor, kept=kept))
        return spans

    def script_finish(self, rows, kept, kwargs):
        modality = "video" if kwargs.get("video_grid_thw") is not None else "image"
        grids = kwargs[f"{modality}_grid_thw"]
        grids = grids.tolist() if isinstance(grids, torch.Tensor) else [g.tolist() for g in grids]
        merge = self.config.vision_config.spatial_merge_size
        seconds = kwargs.get("second_per_grid_ts") if modality == "video" else None
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        out = list(rows)
        for i, keep in enumerate(kept):
            if keep is None:
                continue
            t, h, w = (int(v) for v in grids[i])
            t_factor = _t_factor(None if seconds is None else seconds[i], tokens_per_second)
            offsets = kept_offsets((t, h // merge, w // merge), t_factor, keep)
            out[i] = encode_offsets(rows[i], offsets)
        return out
