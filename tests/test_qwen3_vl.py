"""Qwen3-VL's model side without an engine: deepstack rows follow the kept indices, and a
video's budget is selected frame by frame (`vllm_script.config.frame_counts`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_script.config import ScriptSettings, frame_counts
from vllm_script.methods import divprune_select, uniform_select
from vllm_script.models.common import encode_settings, encode_text
from vllm_script.models.mrope import decode_offsets

D, LEVELS, VOCAB = 16, 2, 40  # main width, deepstack levels, query vocabulary


def model_with(rows: list[torch.Tensor]):
    """The plugin's Qwen3-VL model side over a stand-in for the in-tree encoder."""
    from vllm_script.models.qwen3_vl import Qwen3ScriptModelMixin

    table = torch.randn(VOCAB, D, generator=torch.Generator().manual_seed(9))

    class InTree:
        def embed_multimodal(self, **kwargs):
            return tuple(rows)

        def get_language_model(self):
            return SimpleNamespace(embed_input_ids=lambda ids: table[ids])

        def parameters(self):
            yield table

    class Model(Qwen3ScriptModelMixin, InTree):
        pass

    model = Model.__new__(Model)  # no vLLM config: only what embed_multimodal reads
    model.config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2))
    model.visual_dim = D
    return model


def fields(settings: ScriptSettings, num_items: int, modality: str) -> dict:
    suffix = "" if modality == "image" else f"_{modality}"
    return {
        f"script_settings{suffix}": [encode_settings(settings)] * num_items,
        f"script_query_ids{suffix}": [torch.tensor([3, 7, 11])] * num_items,
        f"script_query_text{suffix}": [encode_text("")] * num_items,
    }


def full_rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D * (1 + LEVELS), generator=torch.Generator().manual_seed(seed))


def test_image_deepstack_rows_follow_the_main_selection():
    rows = full_rows(24, 0)  # grid (1, 8, 12) patches -> 4 x 6 tokens
    settings = ScriptSettings(method="divprune", budget=5)
    kwargs = {"image_grid_thw": torch.tensor([[1, 8, 12]]), **fields(settings, 1, "image")}
    (out,) = model_with([rows]).embed_multimodal(**kwargs)

    keep = divprune_select(rows[None, :, :D], 5).keep[0]  # on the main channels only
    kept_rows, offsets = decode_offsets(out, D * (1 + LEVELS))
    assert torch.equal(kept_rows, rows[keep])  # main and every deepstack level alike
    assert offsets.tolist() == [[0, int(i) // 6, int(i) % 6] for i in keep]

    # the deepstack channels take no part in the selection
    other = rows.clone()
    other[:, D:] = torch.randn(24, D * LEVELS)
    (again,) = model_with([other]).embed_multimodal(**kwargs)
    assert torch.equal(decode_offsets(again, D * (1 + LEVELS))[0], other[keep])


@pytest.mark.parametrize("budget", [7, 3, 24], ids=["budget7", "budget3", "budget-n"])
def test_video_budget_is_selected_frame_by_frame(budget):
    frames, h, w = 4, 2, 3
    rows = full_rows(frames * h * w, 1)
    settings = ScriptSettings(method="uniform", budget=budget)
    kwargs = {
        "video_grid_thw": torch.tensor([[frames, 2 * h, 2 * w]]),
        **fields(settings, 1, "video"),
    }
    (out,) = model_with([rows]).embed_multimodal(**kwargs)
    if budget >= frames * h * w:
        assert out is rows  # unpruned: the encoder's rows as they are
        return
    keep = []
    for f, k in enumerate(frame_counts(budget, frames)):
        if k:
            keep += (uniform_select(h * w, k, (h, w)).keep[0] + f * h * w).tolist()
    kept_rows, offsets = decode_offsets(out, D * (1 + LEVELS))
    assert torch.equal(kept_rows, rows[keep])
    # each frame is its own (1, h, w) grid: offsets are within the frame
    assert offsets.tolist() == [[0, (i % (h * w)) // w, i % w] for i in keep]
