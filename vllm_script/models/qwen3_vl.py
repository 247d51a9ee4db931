"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, and the MoE `Qwen3VLMoeForConditionalGeneration`,
which shares its processor): images and video, deepstack and M-RoPE kept.

Count rule: an image is one item of N = H*W LLM tokens (after the 2x2 merge) and keeps
K = min(budget, N). A video is one item of N = T*H*W tokens (T = frames / 2), and keeps
K = min(budget, N) in all; but Qwen3-VL writes each of its T frames as
`<t seconds><|vision_start|> pads <|vision_end|>`, so the number of pads of every frame
is part of the prompt, fixed before the encoder runs. The budget is therefore spread
over the frames by `vllm_script.config.frame_counts` (floor or ceil of K/T per frame,
the larger shares evenly spaced; with K < T, K evenly spaced frames keep one token
each and the others keep none), the method selects each frame's share among that
frame's tokens, and every frame keeps its timestamp text and vision tags.

Deepstack: each of the encoder's rows is [D main | D per deepstack level]; the method
scores the main D channels only and the kept indices gather whole rows, so the
deepstack features added to the first LLM layers are pruned with exactly the same
indices. Positions: each image and each frame is a (1, H, W) M-RoPE grid; kept tokens
keep theirs and the text after them keeps its positions (`vllm_script.models.qwen_vl`).
Only the LLM-space methods with relevance "llm" are available.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import (
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems, VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from vllm_script.config import frame_counts, kept_count
from vllm_script.models.common import (
    QUERY_KEY,
    SETTINGS_KEY,
    ScriptModelMixin,
    ScriptProcessorMixin,
    _unbatch,
    decode_settings,
    settings_from_kwargs,
)
from vllm_script.models.mrope import MediaSpan, encode_offsets
from vllm_script.models.qwen_vl import QwenModelMixin, QwenProcessorMixin, feature_settings
from vllm_script.pruning import RECORD_ENV, ImageInput, PruneContext, prune_items, record


def media_spans(
    input_tokens,
    items: list[tuple[str, int, int, tuple[int, int, int], int]],
    vision_start_token_id: int,
) -> list[MediaSpan]:
    """Qwen3-VL media items -> M-RoPE spans: one per image, one per video frame.

    items: (modality, placeholder offset, placeholder length, (T, H, W) in LLM tokens,
    kept tokens K) per item. A video's frame f starts after the f-th `<|vision_start|>`
    of its placeholder range and keeps `frame_counts(K, T)[f]` tokens.
    """
    spans = []
    for modality, offset, length, (t, h, w), kept in items:
        if modality == "image":
            spans.append(MediaSpan(offset, (1, h, w), kept=kept))
            continue
        window = list(input_tokens[offset : offset + length])
        starts = [offset + i + 1 for i, tok in enumerate(window) if tok == vision_start_token_id]
        if len(starts) < t:
            raise ValueError(f"video placeholder has {len(starts)} frames, expected {t}")
        counts = frame_counts(kept, t)
        spans.extend(
            MediaSpan(start, (1, h, w), kept=k) for start, k in zip(starts, counts, strict=False)
        )
    return spans


class ScriptQwen3VLProcessor(QwenProcessorMixin, ScriptProcessorMixin, Qwen3VLMultiModalProcessor):
    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        # Qwen3-VL calls the HF processor itself (not `_call_hf_processor`): drop the
        # plugin's keys before, add the per-item fields after
        kwargs = dict(hf_kwargs)
        raw_settings = kwargs.pop(SETTINGS_KEY, None)
        query = kwargs.pop(QUERY_KEY, None) or []
        outputs = super()._apply_hf_processor_main(mm_items, kwargs)
        return self.script_add_fields(outputs, raw_settings, query)

    def script_video_processor(self):
        return self.info.get_video_processor()

    def script_position_limit(self) -> int:
        text = self.info.get_hf_config().text_config
        # vLLM sizes Qwen3-VL's rotary table x4 only with EVS (mrope_positions_factor)
        return text.max_position_embeddings * (4 if self.script_user_evs else 1)

    def script_spans(self, prompt_ids, placeholders, grids):
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        items = []
        for modality, ranges in placeholders.items():
            for r, known in zip(ranges, grids[modality], strict=True):
                if known is None:
                    return None
                (t, h, w), _ = known
                kept = int(r.is_embed.sum()) if r.is_embed is not None else r.length
                items.append((modality, r.offset, r.length, (t, h // merge, w // merge), kept))
        vision_start = self.info.get_hf_config().vision_start_token_id
        return media_spans(prompt_ids, sorted(items, key=lambda x: x[1]), vision_start)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        settings = settings_from_kwargs(hf_processor_mm_kwargs)
        if settings is None and self.script_user_evs:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        merge_length = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size ** 2
        tokenizer = self.info.get_tokenizer()
        cfg = self.info.get_hf_config()

        def kept(modality: str, n: int) -> int:
            # precomputed embeddings carry no settings field: never pruned
            processed = {"image": ImageProcessorItems, "video": VideoProcessorItems}[modality]
            return kept_count(n, settings) if isinstance(mm_items.get(modality), processed) else n

        def image_replacement(item_idx: int):
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return [hf_processor.image_token_id] * kept("image", int(grid.prod()) // merge_length)

        def video_replacement(item_idx: int) -> PromptUpdateDetails:
            item = out_mm_kwargs["video"][item_idx]
            grid = item["video_grid_thw"].data
            frames = int(grid[0])
            total = kept("video", int(grid.prod()) // merge_length)
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=frame_counts(total, frames),
                timestamps=item["timestamps"].data,
                tokenizer=tokenizer,
                vision_start_token_id=cfg.vision_start_token_id,
                vision_end_token_id=cfg.vision_end_token_id,
                video_token_id=cfg.video_token_id,
                select_token_id=True,
            )

        if self._expands_only_video_token(hf_processor):
            video_target = [cfg.video_token_id]
        else:
            video_target = [cfg.vision_start_token_id, cfg.video_token_id, cfg.vision_end_token_id]
        return [
            PromptReplacement(
                modality="image",
                target=[hf_processor.image_token_id],
                replacement=image_replacement,
            ),
            PromptReplacement(modality="video", target=video_target, replacement=video_replacement),
        ]


class Qwen3ScriptModelMixin(QwenModelMixin, ScriptModelMixin):
    """The model side for Qwen3-VL and Qwen3-VL-MoE (mix in before the in-tree class)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.script_qwen_init(vllm_config, self.visual_dim + self.multiscale_dim)

    def script_spans(self, input_tokens, mm_features) -> list[MediaSpan]:
        merge = self.config.vision_config.spatial_merge_size
        items = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            t, h, w = (int(v) for v in feature.data[f"{feature.modality}_grid_thw"].data)
            n = t * (h // merge) * (w // merge)
            pos = feature.mm_position
            grid = (t, h // merge, w // merge)
            kept = kept_count(n, feature_settings(feature))
            items.append((feature.modality, pos.offset, pos.length, grid, kept))
        return media_spans(input_tokens, items, self.config.vision_start_token_id)

    def embed_multimodal(self, **kwargs: object):
        settings_field, query_field, _ = self.script_pop_fields(kwargs)
        rows = super().embed_multimodal(**kwargs)  # no fields left: the in-tree encoder
        if settings_field is None:
            return rows
        settings = [decode_settings(f) for f in _unbatch(settings_field)]
        queries = _unbatch(query_field) if query_field is not None else [None] * len(settings)
        modality = "video" if kwargs.get("video_grid_thw") is not None else "image"
        grids = kwargs[f"{modality}_grid_thw"]
        grids = grids.tolist() if isinstance(grids, torch.Tensor) else [g.tolist() for g in grids]
        merge = self.config.vision_config.spatial_merge_size
        rows = list(rows)
        if len(rows) != len(settings):
            raise RuntimeError(f"vllm-script: {len(rows)} items but {len(settings)} settings")

        # one selection per frame (an image is one frame), batched by prune_items
        frames, frame_settings, owners = [], [], []
        plans: list[tuple[int, int, int, list[int]] | None] = []
        for i, (emb, cfg, query) in enumerate(zip(rows, settings, queries, strict=True)):
            t, h, w = (int(v) for v in grids[i])
            h, w = h // merge, w // merge
            total = kept_count(t * h * w, cfg)
            if total == t * h * w:
                plans.append(None)
                continue
            counts = frame_counts(total, t)
            plans.append((t, h, w, counts))
            for f, k in enumerate(counts):
                if k == 0:
                    continue
                frame = emb[f * h * w : (f + 1) * h * w, : self.visual_dim]
                frames.append(ImageInput(tokens=frame, grid=(h, w), query_ids=query))
                frame_settings.append(replace(cfg, budget=k))
                owners.append((i, f))
        embed_tokens = self.get_language_model().embed_input_ids
        device = next(self.parameters()).device

        def embed_query(ids: torch.Tensor) -> torch.Tensor:
            return embed_tokens(ids.to(device, torch.long))

        kept: list = []
        prune_items(
            frames, frame_settings, PruneContext(embed_query=embed_query), kept_indices=kept
        )
        per_frame = dict(zip(owners, kept, strict=True))
        out = []
        for i, plan in enumerate(plans):
            if plan is None:
                out.append(rows[i])
                continue
            t, h, w, counts = plan
            dev = rows[i].device
            keep = []
            for f, k in enumerate(counts):
                if k == 0:
                    continue
                idx = per_frame[(i, f)]
                idx = torch.arange(h * w, device=dev) if idx is None else idx.to(dev)
                keep.append(idx + f * h * w)
            keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long, device=dev)
            gathered = rows[i].index_select(0, keep)
            keep = keep.cpu()  # one copy per item (not per frame): the offsets are host ints
            within = keep % (h * w)
            offsets = torch.stack([torch.zeros_like(within), within // w, within % w], dim=1)
            out.append(encode_offsets(gathered, offsets))
            if os.environ.get(RECORD_ENV) == "1":
                record(
                    {"kind": "kept", "modality": modality, "grid": [t, h, w], "keep": keep.tolist()}
                )
        return out


@MULTIMODAL_REGISTRY.register_processor(
    ScriptQwen3VLProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ScriptQwen3VLForConditionalGeneration(Qwen3ScriptModelMixin, Qwen3VLForConditionalGeneration):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ScriptQwen3VLProcessor,
    info=Qwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ScriptQwen3VLMoeForConditionalGeneration(
    Qwen3ScriptModelMixin, Qwen3VLMoeForConditionalGeneration
):
    pass
