"""What the Qwen-VL adapters (Qwen2.5-VL, Qwen3-VL) share: M-RoPE positions of kept tokens.

Kept tokens keep their original (t, h, w) positions and the text after an item keeps
its positions (`vllm_script.models.mrope`). The positions reach the LLM in one of two
ways, whichever the model runner uses:

- vLLM's GPU model runners (V1 `GPUModelRunner._gather_mm_embeddings`, V2
  `MultiModalPruner.recompute`) call `recompute_mrope_positions` (their hook for pruned
  media, made for EVS) before the forward and copy the request's positions into their
  own position buffer, the one their piecewise CUDA graphs read. A position tensor
  swapped in inside `forward` would be ignored there: `CUDAGraphWrapper` replays with
  the addresses it captured (vllm/compilation/cuda_graph.py) and the runner always passes
  a slice of its persistent buffer (gpu_model_runner.py, `_preprocess`); under a full
  CUDA graph `forward` does not even run. The runners call the hook only when
  `MultiModalConfig.is_multimodal_pruning_enabled()`, i.e. `video_pruning_rate > 0`;
  the model therefore sets that field on its own worker's config after the in-tree
  model is built (`enable_position_hook`), so the in-tree model and processors never run
  EVS for it, and the plugin's processors treat that value as "no EVS"
  (`user_video_pruning_rate`). The hook strips the offset channels.
- vLLM's CPU model runner never calls the hook: the rows still carry their offset
  channels in `embed_input_ids`, which strips them and leaves the offsets for
  `forward` to add to the positions it is given (no CUDA graphs on CPU).

vLLM's own `--video-pruning-rate` (EVS) and this plugin's settings are not combined: a
server with both refuses to start, and a request with settings on a server with EVS
fails with a clear message. Pipeline parallelism is not supported with pruning.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Sequence

import torch
from vllm.multimodal.parse import ImageProcessorItems, VideoProcessorItems

from vllm_script.config import ScriptSettings, SettingsError, resolve_request_settings
from vllm_script.models.common import FIELD_SETTINGS, SETTINGS_KEY, decode_settings, field_name
from vllm_script.models.mrope import (
    MAX_OFFSET,
    MediaSpan,
    decode_offsets,
    mrope_positions_with_pruning,
    pruned_placeholder_problem,
    recompute_pruned_positions,
)
from vllm_script.pruning import RECORD_ENV, record

logger = logging.getLogger("vllm_script")

# The value the plugin gives `video_pruning_rate` on its own worker's config to turn on
# the GPU runner's position hook; never used as a pruning rate by the plugin's classes.
POSITION_HOOK_RATE = 1e-9
# items whose grids the processor remembers by hash, to check processor-cache hits too
GRID_MEMORY = 4096
_HOOKED_CONFIGS: set[int] = set()


def enable_position_hook(mm_config: object) -> None:
    """Make vLLM's GPU model runner call the model's `recompute_mrope_positions`."""
    if mm_config is None or mm_config.is_multimodal_pruning_enabled():
        return
    mm_config.video_pruning_rate = POSITION_HOOK_RATE
    _HOOKED_CONFIGS.add(id(mm_config))


def user_video_pruning_rate(mm_config: object) -> float | None:
    """The `--video-pruning-rate` the user set (None when unset, 0 or set by the plugin)."""
    if mm_config is None or id(mm_config) in _HOOKED_CONFIGS:
        return None
    return getattr(mm_config, "video_pruning_rate", None) or None


def refuse_with_evs(video_pruning_rate: float | None, where: str) -> None:
    if video_pruning_rate:
        raise SettingsError(
            f"{where}: 'script' settings cannot be combined with --video-pruning-rate "
            f"({video_pruning_rate}); use one of them"
        )


def feature_settings(feature: object) -> ScriptSettings | None:
    """The settings a request attached to one media item (None: not pruned)."""
    field = feature.data.get(field_name(FIELD_SETTINGS, feature.modality))
    return None if field is None else decode_settings(field.data)


class QwenProcessorMixin:
    """Mix in before `ScriptProcessorMixin` in a Qwen-VL processor subclass."""

    script_modalities = ("image", "video")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.script_server_settings is not None:
            refuse_with_evs(self.script_user_evs, "server setting (hf_overrides)")
        self._script_grids: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    @property
    def script_user_evs(self) -> float | None:
        return user_video_pruning_rate(self.info.ctx.get_mm_config())

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

    def script_video_processor(self):
        """The processor vLLM's `get_num_video_tokens` expects for this model's videos."""
        return self.info.get_image_processor()

    def script_num_tokens(self, mm_items, modality: str, item_idx: int) -> int | None:
        items = mm_items.get(modality)
        if modality == "image" and isinstance(items, ImageProcessorItems):
            size = items.get_image_size(item_idx)
            return self.info.get_num_image_tokens(
                image_width=size.width,
                image_height=size.height,
                image_processor=self.info.get_image_processor(),
                mm_kwargs={},
            )
        if modality == "video" and isinstance(items, VideoProcessorItems):
            video = items.get(item_idx)
            frames = video[0] if isinstance(video, tuple) else video  # (frames, metadata)
            return self.info.get_num_video_tokens(
                image_width=frames.shape[2],
                image_height=frames.shape[1],
                num_frames=frames.shape[0],
                image_processor=self.script_video_processor(),
                mm_kwargs={},
            )
        return None

    def script_position_limit(self) -> int:
        """Rows of the model's rotary table: positions must stay below this."""
        raise NotImplementedError

    def script_spans(self, prompt_ids: Sequence[int], placeholders, grids):
        """Media spans of a processed prompt, from `script_item_grids`' grids (None when an
        item's grid is not known)."""
        raise NotImplementedError

    def script_item_grids(self, out) -> dict[str, list[tuple | None]]:
        """Per modality and item: (grid_thw, second_per_grid_ts or None), or None if unknown.

        A processor-cache hit carries no item data, so the grids of the last GRID_MEMORY
        items are remembered by their hash: a request refused once (its sender-cache entry
        already made) is refused again when it is sent again, instead of reaching the engine.
        """
        memory = self._script_grids
        grids = {}
        for modality, ranges in out["mm_placeholders"].items():
            items = out["mm_kwargs"].get(modality) or [None] * len(ranges)
            hashes = out.get("mm_hashes", {}).get(modality) or [None] * len(ranges)
            row = []
            for item, key in zip(items, hashes, strict=True):
                if item is None:
                    row.append(memory.get(key) if key is not None else None)
                    continue
                seconds = item.get("second_per_grid_ts")
                grid = (
                    tuple(int(v) for v in item[f"{modality}_grid_thw"].data),
                    None if seconds is None else float(seconds.data),
                )
                row.append(grid)
                if key is not None:
                    memory[key] = grid
                    memory.move_to_end(key)
                    if len(memory) > GRID_MEMORY:
                        memory.popitem(last=False)
            grids[modality] = row
        return grids

    def apply(self, inputs, timing_ctx):
        out = super().apply(inputs, timing_ctx)
        raw = inputs.hf_processor_mm_kwargs.get(SETTINGS_KEY)
        settings = resolve_request_settings(self.script_server_settings, raw)
        if settings is not None and raw is not None:
            refuse_with_evs(self.script_user_evs, "request setting (mm_processor_kwargs)")
        self.script_check_positions(out, settings)
        return out

    def script_check_positions(self, out, settings: ScriptSettings | None) -> None:
        """Refuse (ValueError, a 400) a request whose positions cannot be placed.

        Any request whose prompt positions pass the model's rotary table (vLLM's worker
        would fail on it and stop: e.g. a Qwen2.5-VL video of a few frames hours apart);
        and, when it prunes, placeholders that touch or end the prompt, or positions that
        pass the table while decoding up to `max_model_len`. The positions are checked
        whenever the items' grids are known (`script_item_grids`: processor-cache hits of
        the last GRID_MEMORY items included); otherwise the model clamps as a last resort.
        """
        if self.script_user_evs:  # vLLM's EVS places its own positions
            return
        prompt = out["prompt_token_ids"]
        if settings is not None:
            runs = []
            for ranges in out["mm_placeholders"].values():
                for r in ranges:
                    flags = r.is_embed.tolist() if r.is_embed is not None else [True] * r.length
                    runs.append((r.offset, flags))
            problem = pruned_placeholder_problem(len(prompt), runs)
            if problem is not None:
                raise ValueError(f"vllm-script cannot prune this request: {problem}")
        grids = self.script_item_grids(out)
        spans = self.script_spans(prompt, out["mm_placeholders"], grids)
        if not spans:
            return
        positions, _ = mrope_positions_with_pruning(len(prompt), spans)
        largest = max(s.max_offset for s in spans)
        limit = self.script_position_limit()
        end = int(positions.max()) + 1
        if settings is not None:
            end += max(self.info.ctx.model_config.max_model_len - len(prompt), 0)
            if largest > MAX_OFFSET:
                raise ValueError(
                    f"vllm-script cannot prune this request: a position offset of {largest} "
                    f"inside one image or video, more than the {MAX_OFFSET} it carries"
                )
        if end > limit:
            what = "decoding to max_model_len included, " if settings is not None else ""
            raise ValueError(
                f"this request's M-RoPE positions reach {end - 1} ({what}largest offset "
                f"inside one image or video: {largest}), beyond the model's rotary table "
                f"({limit} positions); send a shorter video (fewer frames or a higher fps)"
            )


class QwenModelMixin:
    """Mix in before `ScriptModelMixin` in a Qwen-VL model subclass.

    Subclasses call `script_qwen_init(vllm_config, row_width)` at the end of `__init__`
    and implement `script_spans` (the media spans of a request, for its positions).
    """

    script_modalities = ("image", "video")

    def script_qwen_init(self, vllm_config: object, row_width: int) -> None:
        self.script_init(vllm_config)
        # the in-tree model read the rate before the plugin may set it (enable_position_hook)
        self._script_user_evs = self.video_pruning_rate or None
        if self.script_server_settings is not None:
            refuse_with_evs(self._script_user_evs, "server setting (hf_overrides)")
        self._script_row_width = row_width
        self._script_pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._script_position_limit = self._script_rotary_rows()
        self._script_max_model_len = vllm_config.model_config.max_model_len
        if self._script_user_evs is None:
            enable_position_hook(vllm_config.model_config.multimodal_config)

    def _script_rotary_rows(self) -> int:
        rows = [
            m.cos_sin_cache.shape[0]
            for m in self.modules()
            if type(m).__name__ == "MRotaryEmbedding" and hasattr(m, "cos_sin_cache")
        ]
        return min(rows) if rows else 1 << 62

    def _script_media_ids(self) -> tuple[int, int]:
        return (self.config.image_token_id, self.config.video_token_id)

    def script_spans(self, input_tokens, mm_features) -> list[MediaSpan]:
        raise NotImplementedError

    def _script_clamp(self, positions: torch.Tensor, what: str) -> torch.Tensor:
        limit = self._script_position_limit
        if positions.numel() and int(positions.max()) >= limit:
            logger.warning(
                "vllm-script: %s reach position %d, beyond the rotary table (%d); clamped",
                what,
                int(positions.max()),
                limit,
            )
            return positions.clamp(max=limit - 1)
        return positions

    # -- positions, step 1: when a request is added ---------------------------------

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self._script_user_evs is not None:  # vLLM's EVS: its prompts, its positions
            return super().get_mrope_input_positions(input_tokens, mm_features)
        spans = self.script_spans(input_tokens, mm_features)
        positions, delta = mrope_positions_with_pruning(len(input_tokens), spans)
        # past the rotary table vLLM's worker fails (the processor refuses such requests
        # unless their items came from its cache): clamp rather than stop the engine
        positions = self._script_clamp(positions, "a request's positions")
        if any(s.pruned for s in spans):
            room = self._script_position_limit - self._script_max_model_len
            delta = min(delta, room)
            if os.environ.get(RECORD_ENV) == "1":
                record({"kind": "prompt_positions", "positions": positions.T.tolist()})
        return positions, delta

    # -- positions, step 2 on the GPU runner: vLLM's hook for pruned media ------------

    def recompute_mrope_positions(
        self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
    ):
        if self._script_user_evs is not None:  # the in-tree EVS rows
            return super().recompute_mrope_positions(
                input_ids=input_ids,
                multimodal_embeddings=multimodal_embeddings,
                mrope_positions=mrope_positions,
                num_computed_tokens=num_computed_tokens,
            )
        rows, positions, delta = recompute_pruned_positions(
            input_ids,
            multimodal_embeddings,
            mrope_positions,
            num_computed_tokens,
            media_token_ids=self._script_media_ids(),
            hidden_size=self._script_row_width,
        )
        if positions is not mrope_positions:
            positions = self._script_clamp(positions, "kept tokens")
            if os.environ.get(RECORD_ENV) == "1":
                record({"kind": "hook_positions", "positions": positions.T.tolist()})
        return rows, positions, delta

    # -- positions, step 2 on the CPU runner: offsets ride with the rows to forward --

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if multimodal_embeddings is None or is_multimodal is None:
            return super().embed_input_ids(input_ids)
        stripped, offsets, carried = [], [], False
        for emb in multimodal_embeddings:
            rows, off = decode_offsets(emb, self._script_row_width)
            stripped.append(rows)
            carried |= off is not None
            if off is None:  # an unpruned item: its positions are final already
                off = torch.zeros(rows.shape[0], 3, dtype=torch.long, device=rows.device)
            offsets.append(off)
        if carried:
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
                positions = self._script_clamp(positions, "kept tokens")
                if os.environ.get(RECORD_ENV) == "1":
                    record({"kind": "positions", "positions": positions[:, slots].T.tolist()})
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def get_encoder_cudagraph_config(self):
        # the encoder CUDA-graph path bypasses embed_multimodal, i.e. the pruning
        config = super().get_encoder_cudagraph_config()
        return dataclasses.replace(config, modalities=[])
