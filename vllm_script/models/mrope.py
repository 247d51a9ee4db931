"""M-RoPE positions for pruned media items (Qwen2-VL family), without vLLM imports.

A media item of grid (T, H, W) (after the 2x2 merge) has N = T*H*W tokens whose
original positions are `start + (t * t_factor, h, w)`. When only K of them are kept, the
kept tokens keep exactly those positions, and the text after the item continues where
it would have without pruning: `start + max position offset + 1`. (Qwen3-VL describes
each video frame as its own (1, H, W) item, with timestamp text between frames.)

The positions of the K kept tokens depend on which tokens the selection keeps, known
only after the vision encoder ran, while vLLM computes a request's positions when the
request is added. So positions are assembled in two steps:
1. `mrope_positions_with_pruning` (request added): every kept slot gets the item's start
   position `(s, s, s)`; text positions are final.
2. The model, after selection, carries each kept token's offset `(t, h, w)` in extra
   embedding channels (`encode_offsets`, as vLLM's own EVS carries positions). Then
   either vLLM's GPU model runner calls the model's `recompute_mrope_positions`, which
   writes `start + offset` into the request's stored positions
   (`recompute_pruned_positions`), or, on runners that never call that hook (the CPU
   runner), the model adds the offsets to the positions it is given in `forward`.

Both steps need every pruned item's placeholders to follow a text token (Qwen's
`<|vision_start|>`), so that the start is that token's position + 1, and the prompt to
end with text, so that the last position (the largest) fixes the decoding offset;
`pruned_placeholder_problem` checks this in the processor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Offsets travel inside embeddings, whose dtype may be bf16 (8 significant bits: integers
# up to 256 are exact): each offset is written as OFFSET_DIGITS base-128 digits.
OFFSET_BASE = 128
OFFSET_DIGITS = 3
OFFSET_CHANNELS = 3 * OFFSET_DIGITS
MAX_OFFSET = OFFSET_BASE**OFFSET_DIGITS - 1  # 2_097_151: any offset up to this is exact

logger = logging.getLogger("vllm_script")


@dataclass(frozen=True)
class MediaSpan:
    """One media item in the prompt: where its placeholders start and its grid.

    offset: index of its first placeholder token in the prompt; grid: (T, H, W) in LLM
    tokens; t_factor: temporal position step per grid step (videos); kept: number of
    placeholders in the prompt (T*H*W when not pruned; may be 0).
    """

    offset: int
    grid: tuple[int, int, int]
    t_factor: float = 1.0
    kept: int | None = None

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def num_placeholders(self) -> int:
        return self.num_tokens if self.kept is None else self.kept

    @property
    def pruned(self) -> bool:
        return self.num_placeholders < self.num_tokens

    @property
    def max_offset(self) -> int:
        """Largest position offset of the item's tokens (over t, h and w)."""
        t, h, w = self.grid
        return max(int((t - 1) * self.t_factor), h - 1, w - 1)


def grid_offsets(grid: tuple[int, int, int], t_factor: float = 1.0) -> np.ndarray:
    """(T, H, W) -> int64 [3, T*H*W]: (t, h, w) position offsets in raster order."""
    t, h, w = grid
    idx = np.indices((t, h, w)).reshape(3, -1)
    if t_factor != 1.0:
        idx[0] = (idx[0] * t_factor).astype(np.int64)
    return idx.astype(np.int64)


def mrope_positions_with_pruning(
    num_prompt_tokens: int, spans: Sequence[MediaSpan]
) -> tuple[torch.Tensor, int]:
    """prompt length, media spans -> (positions int64 [3, L], mrope_position_delta).

    Unpruned items get vLLM's positions exactly; a pruned item's K slots all get its
    start position (see module docstring), and the text after it continues as if every
    token had been kept.
    """
    parts: list[np.ndarray] = []
    next_pos = 0
    cursor = 0
    for span in sorted(spans, key=lambda s: s.offset):
        text_len = span.offset - cursor
        parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
        start = next_pos + text_len
        if span.pruned:
            parts.append(np.full((3, span.num_placeholders), start, dtype=np.int64))
        else:
            parts.append(grid_offsets(span.grid, span.t_factor) + start)
        next_pos = start + span.max_offset + 1 if span.num_tokens else start
        cursor = span.offset + span.num_placeholders
    tail = num_prompt_tokens - cursor
    parts.append(np.broadcast_to(np.arange(tail), (3, tail)) + next_pos)
    positions = np.concatenate(parts, axis=1)
    delta = int(positions.max()) + 1 - num_prompt_tokens if positions.size else 0
    return torch.from_numpy(np.ascontiguousarray(positions)), delta


def kept_offsets(grid: tuple[int, int, int], t_factor: float, keep: torch.Tensor) -> torch.Tensor:
    """Kept token indices [K] -> int64 [K, 3]: their original (t, h, w) offsets."""
    offsets = torch.from_numpy(grid_offsets(grid, t_factor))
    return offsets[:, keep.cpu()].T.contiguous()


def encode_offsets(embeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[K, D], int [K, 3] -> [K, D + 9]: offsets appended as exact base-128 digits.

    Offsets above MAX_OFFSET cannot be carried: the processor refuses such requests
    (`QwenProcessorMixin.script_check_positions`). This runs in the worker, where raising
    would stop the engine, so any that still arrive are clamped into range (logged): their
    positions are wrong, as they would be clamped to the rotary table later anyway.
    """
    rest = offsets.long()
    if rest.numel() and (int(rest.max()) > MAX_OFFSET or int(rest.min()) < 0):
        logger.warning(
            "vllm-script: position offset %d outside [0, %d]; clamped",
            int(rest.max()),
            MAX_OFFSET,
        )
        rest = rest.clamp(0, MAX_OFFSET)
    digits = []
    for _ in range(OFFSET_DIGITS):
        digits.append(rest % OFFSET_BASE)
        rest = torch.div(rest, OFFSET_BASE, rounding_mode="floor")
    extra = torch.cat(digits, dim=1).to(device=embeds.device, dtype=embeds.dtype)
    return torch.cat([embeds, extra], dim=1)


def decode_offsets(
    embeds: torch.Tensor, hidden_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[K, D(+9)] -> ([K, D], int64 [K, 3] offsets, or None when the rows carry none)."""
    if embeds.shape[-1] == hidden_size:
        return embeds, None
    if embeds.shape[-1] != hidden_size + OFFSET_CHANNELS:
        raise ValueError(
            f"media embedding width {embeds.shape[-1]}: expected {hidden_size} or "
            f"{hidden_size + OFFSET_CHANNELS}"
        )
    digits = embeds[:, hidden_size:].float().round().long()
    offsets = torch.zeros(embeds.shape[0], 3, dtype=torch.long, device=embeds.device)
    for d in reversed(range(OFFSET_DIGITS)):
        offsets = offsets * OFFSET_BASE + digits[:, 3 * d : 3 * d + 3]
    return embeds[:, :hidden_size], offsets


def recompute_pruned_positions(
    input_ids: Sequence[int] | torch.Tensor,
    multimodal_embeddings: Sequence[torch.Tensor],
    mrope_positions: torch.Tensor,
    num_computed_tokens: int,
    *,
    media_token_ids: Sequence[int],
    hidden_size: int,
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """vLLM's `recompute_mrope_positions` hook for rows that carry their offsets.

    input_ids: the whole prompt [L]; multimodal_embeddings: the media rows of this
    prefill chunk, item by item (possibly the tail of an item begun in an earlier chunk),
    which fill the media placeholders at and after `num_computed_tokens` in order;
    mrope_positions: int64 [3, L], the request's stored positions (step 1, possibly
    already updated for earlier chunks). Returns (the rows without the offset channels,
    positions [3, L] with each carried row's slot at `start + offset`, where `start` is
    the position after the text token before the slot's placeholder run, and the
    decoding offset `largest position + 1 - L`). Idempotent; unpruned rows are untouched.
    """
    stripped, carried = [], []
    for emb in multimodal_embeddings:
        rows, offsets = decode_offsets(emb, hidden_size)
        stripped.append(rows)
        carried.append(offsets)
    positions = mrope_positions
    if any(c is not None for c in carried):
        device = positions.device
        ids = torch.as_tensor(input_ids, device=device).long()
        media = torch.isin(ids, torch.tensor(list(media_token_ids), device=device))
        index = torch.arange(ids.numel(), device=device)
        slots = index[media & (index >= num_computed_tokens)]
        num_rows = sum(r.shape[0] for r in stripped)
        if slots.numel() < num_rows:
            raise RuntimeError(
                f"vllm-script: {num_rows} media rows but {slots.numel()} placeholders "
                f"after token {num_computed_tokens}"
            )
        # the text token before each placeholder run fixes the run's start position
        last_text = torch.where(media, torch.full_like(index, -1), index).cummax(0).values
        positions = positions.clone()
        cursor = 0
        for rows, offsets in zip(stripped, carried, strict=True):
            item_slots = slots[cursor : cursor + rows.shape[0]]
            cursor += rows.shape[0]
            if offsets is None or not item_slots.numel():
                continue
            before = last_text[item_slots]
            start = torch.where(
                before >= 0, positions[0, before.clamp(min=0)] + 1, torch.zeros_like(before)
            )
            positions[:, item_slots] = start + offsets.to(device).T
    # the last token holds the largest position (text, or an unpruned item's last token,
    # largest in each of t, h and w): O(1) where the max over [3, L] would be O(L), and
    # the runner calls this whenever a scheduled window holds media embeddings
    length = positions.shape[1]
    delta = int(positions[:, -1].max()) + 1 - length if length else 0
    return stripped, positions, delta


def pruned_placeholder_problem(
    prompt_length: int, embed_runs: Sequence[tuple[int, Sequence[bool]]]
) -> str | None:
    """Why pruned positions cannot be placed in this prompt, or None when they can.

    embed_runs: per media item, (offset of its placeholder range, its is-embedding flags).
    No item's embedding tokens may directly follow another item's, and the prompt must
    not end with an embedding token (see the module docstring).
    """
    owner = np.full(prompt_length, -1, dtype=np.int64)
    for item, (offset, flags) in enumerate(embed_runs):
        mask = np.asarray(flags, dtype=bool)
        owner[offset : offset + len(mask)][mask] = item
    if prompt_length and owner[-1] >= 0:
        return "the prompt ends with an image or video placeholder; end it with text"
    touching = (owner[1:] >= 0) & (owner[:-1] >= 0) & (owner[1:] != owner[:-1])
    if touching.any():
        return (
            "two images or videos have adjacent placeholders; separate them with text "
            "(e.g. <|vision_end|><|vision_start|>)"
        )
    return None
