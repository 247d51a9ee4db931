"""M-RoPE positions for pruned media items (Qwen2-VL family), without vLLM imports.

A media item of grid (T, H, W) (after the 2x2 merge) has N = T*H*W tokens whose
original positions are `start + (t * t_factor, h, w)`. When only K of them are kept, the
kept tokens keep exactly those positions, and the text after the item continues where
it would have without pruning: `start + max position offset + 1`.

The positions of the K kept tokens depend on which tokens the selection keeps, known
only after the vision encoder ran, while vLLM computes a request's positions when the
request is added. So positions are assembled in two steps:
1. `mrope_positions_with_pruning` (request added): every kept slot gets the item's start
   position `(s, s, s)`; text positions are final.
2. The model, after selection, carries each kept token's offset `(t, h, w)` to the LLM
   forward (`encode_offsets` / `decode_offsets`, packed into extra embedding channels as
   vLLM's own EVS does), where `positions[:, slot] += offset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Offsets travel inside embeddings (bf16 has 8 significant bits): each offset is split
# into two channels, hi = v // 128 and lo = v % 128, both exact in bf16/fp16.
OFFSET_BASE = 128
OFFSET_CHANNELS = 6


@dataclass(frozen=True)
class MediaSpan:
    """One media item in the prompt: where its placeholders start and its grid.

    offset: index of its first placeholder token in the prompt; grid: (T, H, W) in LLM
    tokens; t_factor: temporal position step per grid step (videos); kept: number of
    placeholders in the prompt (T*H*W when not pruned).
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
        offsets = grid_offsets(span.grid, span.t_factor)
        if span.pruned:
            parts.append(np.full((3, span.num_placeholders), start, dtype=np.int64))
        else:
            parts.append(offsets + start)
        next_pos = start + int(offsets.max()) + 1 if offsets.size else start
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
    """[K, D], int [K, 3] -> [K, D + 6]: offsets appended as exact (hi, lo) channels."""
    if offsets.numel() and int(offsets.max()) >= OFFSET_BASE * OFFSET_BASE // 2:
        raise ValueError(f"position offset {int(offsets.max())} too large to carry")
    hi = torch.div(offsets, OFFSET_BASE, rounding_mode="floor")
    lo = offsets - hi * OFFSET_BASE
    extra = torch.cat([hi, lo], dim=1).to(device=embeds.device, dtype=embeds.dtype)
    return torch.cat([embeds, extra], dim=1)


def decode_offsets(embeds: torch.Tensor, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, D(+6)] -> ([K, D], int64 [K, 3]); zero offsets when none are carried."""
    if embeds.shape[-1] == hidden_size:
        return embeds, torch.zeros(embeds.shape[0], 3, dtype=torch.long, device=embeds.device)
    if embeds.shape[-1] != hidden_size + OFFSET_CHANNELS:
        raise ValueError(
            f"media embedding width {embeds.shape[-1]}: expected {hidden_size} or "
            f"{hidden_size + OFFSET_CHANNELS}"
        )
    extra = embeds[:, hidden_size:].float().round().long()
    offsets = extra[:, :3] * OFFSET_BASE + extra[:, 3:]
    return embeds[:, :hidden_size], offsets
