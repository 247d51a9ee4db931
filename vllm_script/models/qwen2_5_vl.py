"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): images and video, M-RoPE kept.

Count rule: an image or a video is one item of N = T*H*W LLM tokens (after the 2x2
merge; T = 1 for an image, frames / 2 for a video). The budget is per item: a video's
frames are pooled and the method picks K = min(budget, N) tokens over all of them, so
it may keep more from a busy frame than from a static one. Only the LLM-space methods
(script, gsp, qcsp, divprune, uniform) with relevance "llm" are available.

Positions: kept tokens keep their original M-RoPE positions (t, h, w), and the text
after an item keeps the positions it has without pruning (see `vllm_script.models.mrope`).
vLLM's own position hook for pruned media (`recompute_mrope_positions`) only runs on the
GPU model runner and only with `--video-pruning-rate`, so this model does it itself,
with public model methods only: `get_mrope_input_positions` (placeholder slots at the
item's start), `embed_multimodal` (each kept row carries its (t, h, w) offset in extra
channels, as vLLM's EVS carries positions), `embed_input_ids` (strips them) and
`forward` (adds them to the slots' positions). Pipeline parallelism is not supported
with pruning (later stages would not see the offsets).

vLLM's `--video-pruning-rate` (EVS) and this plugin's settings are not combined: a
server with both refuses to start, and a request with settings and a video on a server
with EVS fails with a clear message.
"""

from __future__ import annotations

import dataclasses
import os
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

from vllm_script.config import SettingsError, kept_count
from vllm_script.models.common import (
    FIELD_SETTINGS,
    ScriptModelMixin,
    ScriptProcessorMixin,
    decode_settings,
    field_name,
    settings_from_kwargs,
)
from vllm_script.models.mrope import (
    MediaSpan,
    decode_offsets,
    encode_offsets,
    kept_offsets,
    mrope_positions_with_pruning,
)
from vllm_script.pruning import RECORD_ENV, record


def _refuse_with_evs(video_pruning_rate: float | None, where: str) -> None:
    if video_pruning_rate:
        raise SettingsError(
            f"{where}: 'script' settings cannot be combined with --video-pruning-rate "
            f"({video_pruning_rate}); use one of them"
        )


class ScriptQwen2_5_VLProcessor(ScriptProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    script_modalities = ("image", "video")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.script_server_settings is not None:
            _refuse_with_evs(
                self.info.ctx.get_mm_config().video_pruning_rate, "server setting (hf_overrides)"
            )

    def script_placeholder_ids(self):
        cfg = self.info.get_hf_config()
        return [
            cfg.image_token_id,
            cfg.video_token_id,
            cfg.vision_start_token_id,
            cfg.vision_end_token_id,
        ]

    def script_num_items(self, hf_outputs, modality: str) -> int:
        grid = hf_outputs.get(f"{modality}_grid_thw")
        return 0 if grid is None else len(grid)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields.update(self.script_fields_config())
        return fields

    def script_num_tokens(self, mm_items, modality: str, item_idx: int) -> int | None:
        items = mm_items.get(modality)
        processor = self.info.get_image_processor()
        if modality == "image" and isinstance(items, ImageProcessorItems):
            size = items.get_image_size(item_idx)
            return self.info.get_num_image_tokens(
                image_width=size.width,
                image_height=size.height,
                image_processor=processor,
                mm_kwargs={},
            )
        if modality == "video" and isinstance(items, VideoProcessorItems):
            size = items.get_frame_size(item_idx)
            return self.info.get_num_video_tokens(
                image_width=size.width,
                image_height=size.height,
                num_frames=items.get_num_frames(item_idx),
                image_processor=processor,
                mm_kwargs={},
            )
        return None

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        settings = settings_from_kwargs(hf_processor_mm_kwargs)
        if settings is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if "video" in mm_items:
            _refuse_with_evs(
                self.info.ctx.get_mm_config().video_pruning_rate,
                "request setting (mm_processor_kwargs)",
            )
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
    ScriptModelMixin, Qwen2_5_VLForConditionalGeneration
):
    script_modalities = ("image", "video")

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.script_init(vllm_config)
        if self.script_server_settings is not None:
            _refuse_with_evs(self.video_pruning_rate, "server setting (hf_overrides)")
        self._script_hidden = vllm_config.model_config.hf_config.text_config.hidden_size
        self._script_pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- positions, step 1: when a request is added ---------------------------------

    def get_mrope_input_positions(self, input_tokens, mm_features):
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        spans = []
        for feature, (offset, t, h, w, t_factor) in zip(
            features, self.iter_mm_grid_thw(mm_features), strict=True
        ):
            field = feature.data.get(field_name(FIELD_SETTINGS, feature.modality))
            settings = None if field is None else decode_settings(field.data)
            kept = kept_count(t * h * w, settings)
            spans.append(MediaSpan(offset, (t, h, w), t_factor, kept=kept))
        return mrope_positions_with_pruning(len(input_tokens), spans)

    # -- positions, step 2: after selection, offsets ride along with the rows -------

    def script_finish(self, rows, kept, kwargs):
        modality = "video" if kwargs.get("video_grid_thw") is not None else "image"
        grids = kwargs[f"{modality}_grid_thw"]
        grids = grids.tolist() if isinstance(grids, torch.Tensor) else [g.tolist() for g in grids]
        merge = self.config.vision_config.spatial_merge_size
        seconds = kwargs.get("second_per_grid_ts")
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        out = list(rows)
        for i, keep in enumerate(kept):
            if keep is None:
                continue
            t, h, w = (int(v) for v in grids[i])
            t_factor = 1.0
            if modality == "video" and seconds is not None:
                t_factor = float(seconds[i]) * tokens_per_second
            offsets = kept_offsets((t, h // merge, w // merge), t_factor, keep)
            out[i] = encode_offsets(rows[i], offsets)
        return out

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if multimodal_embeddings is None or is_multimodal is None:
            return super().embed_input_ids(input_ids)
        stripped, offsets = [], []
        for emb in multimodal_embeddings:
            rows, off = decode_offsets(emb, self._script_hidden)
            stripped.append(rows)
            offsets.append(off)
        if offsets and any(o.any() for o in offsets):
            self._script_pending = (is_multimodal.clone(), torch.cat(offsets))
        return super().embed_input_ids(input_ids, stripped, is_multimodal=is_multimodal)

    def forward(
        self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs
    ):
        pending, self._script_pending = self._script_pending, None
        if pending is not None and positions.dim() == 2:
            is_mm, offsets = pending
            slots = is_mm.nonzero().squeeze(1)
            if slots.numel() == offsets.shape[0] and is_mm.shape[0] <= positions.shape[1]:
                positions = positions.clone()
                positions[:, slots] += offsets.T.to(positions.device, positions.dtype)
                if os.environ.get(RECORD_ENV) == "1":
                    record({"kind": "positions", "positions": positions[:, slots].T.tolist()})
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def get_encoder_cudagraph_config(self):
        # the encoder CUDA-graph path bypasses embed_multimodal, i.e. the pruning
        config = super().get_encoder_cudagraph_config()
        return dataclasses.replace(config, modalities=[])
