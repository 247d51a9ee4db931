"""M-RoPE positions for pruned media: the text keeps its positions, kept tokens theirs."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from vllm_script.models.mrope import (
    MAX_OFFSET,
    OFFSET_CHANNELS,
    MediaSpan,
    decode_offsets,
    encode_offsets,
    grid_offsets,
    kept_offsets,
    mrope_positions_with_pruning,
)

SPANS = [
    [],
    [MediaSpan(offset=3, grid=(1, 4, 6))],
    [MediaSpan(offset=0, grid=(1, 2, 2)), MediaSpan(offset=9, grid=(1, 3, 5))],
    [MediaSpan(offset=5, grid=(3, 2, 4), t_factor=2.0)],
]


def vllm_positions(length: int, spans: list[MediaSpan]) -> tuple[torch.Tensor, int]:
    """vLLM's own Qwen2.5-VL positions for an unpruned prompt."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    fake = SimpleNamespace(
        iter_mm_grid_thw=lambda _: ((s.offset, *s.grid, s.t_factor) for s in spans)
    )
    return Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(fake, [0] * length, [])


@pytest.mark.parametrize("spans", SPANS, ids=["text", "image", "two-images", "video"])
def test_unpruned_positions_equal_vllms(spans):
    length = 40 + sum(s.num_tokens for s in spans)
    ours, delta = mrope_positions_with_pruning(length, spans)
    theirs, their_delta = vllm_positions(length, spans)
    assert torch.equal(ours, theirs.long()) and delta == their_delta


@pytest.mark.parametrize("spans", SPANS[1:], ids=["image", "two-images", "video"])
def test_pruned_tokens_keep_original_positions_and_text_is_unchanged(spans):
    gen = torch.Generator().manual_seed(0)
    text = 40
    full_len = text + sum(s.num_tokens for s in spans)
    full, full_delta = mrope_positions_with_pruning(full_len, spans)

    pruned_spans, keeps, shift = [], [], 0
    for s in spans:
        k = max(1, s.num_tokens // 3)
        keep = torch.randperm(s.num_tokens, generator=gen)[:k].sort().values
        keeps.append(keep)
        pruned_spans.append(MediaSpan(s.offset - shift, s.grid, s.t_factor, kept=k))
        shift += s.num_tokens - k
    pruned, delta = mrope_positions_with_pruning(full_len - shift, pruned_spans)

    # after adding each kept token's offset, every position equals the unpruned one
    fixed = pruned.clone()
    for span, keep in zip(pruned_spans, keeps, strict=True):
        slots = slice(span.offset, span.offset + span.num_placeholders)
        fixed[:, slots] += kept_offsets(span.grid, span.t_factor, keep).T
    keep_mask = torch.ones(full_len, dtype=torch.bool)
    for s, keep in zip(spans, keeps, strict=True):
        dropped = torch.ones(s.num_tokens, dtype=torch.bool)
        dropped[keep] = False
        keep_mask[s.offset : s.offset + s.num_tokens][dropped] = False
    assert torch.equal(fixed, full[:, keep_mask])
    # decoding continues from the same position: delta shifts by the pruned count
    assert delta == full_delta + shift


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_offsets_survive_low_precision_channels(dtype):
    # 8192 and above raised before (two base-128 digits, issue 10): now carried exactly
    offsets = torch.tensor(
        [[0, 0, 0], [127, 128, 300], [5000, 1, 77], [8192, 16383, 16384], [MAX_OFFSET, 0, 1]]
    )
    embeds = torch.randn(5, 16, dtype=dtype)
    carried = encode_offsets(embeds, offsets)
    assert carried.shape == (5, 16 + OFFSET_CHANNELS) and carried.dtype == dtype
    stripped, back = decode_offsets(carried, 16)
    assert torch.equal(back, offsets) and torch.equal(stripped, embeds)
    plain, none = decode_offsets(embeds, 16)
    assert plain is embeds and none is None


def test_offset_beyond_the_carried_range_is_clamped_not_raised(caplog):
    # in the worker a raise stops the engine: out-of-range offsets are clamped and logged
    with caplog.at_level(logging.WARNING, logger="vllm_script"):
        carried = encode_offsets(
            torch.zeros(2, 4), torch.tensor([[MAX_OFFSET + 1, 0, 0], [-3, 5, 7]])
        )
    _, back = decode_offsets(carried, 4)
    assert back.tolist() == [[MAX_OFFSET, 0, 0], [0, 5, 7]]
    assert "outside" in caplog.text


def test_grid_offsets_raster_order():
    off = grid_offsets((2, 2, 3), t_factor=4.0)
    assert off[:, 0].tolist() == [0, 0, 0]
    assert off[:, 5].tolist() == [0, 1, 2]
    assert off[:, 6].tolist() == [4, 0, 0]
