"""Kept tokens' positions through vLLM's GPU-runner hook (`recompute_mrope_positions`).

The hook is driven by vLLM's own code that calls it on the GPU: `GPUModelRunner.
_gather_mm_embeddings` (model runner V1) and `MultiModalPruner.recompute` (model runner
V2, the default on GPUs with Triton), run unchanged on stand-in runners (no GPU needed),
prefill chunk after prefill chunk, and the positions it leaves for each chunk are
compared with vLLM's own positions of the unpruned prompt at the kept tokens (Qwen2.5-VL
and Qwen3-VL position code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_script.config import frame_counts
from vllm_script.models.mrope import (
    MediaSpan,
    encode_offsets,
    kept_offsets,
    mrope_positions_with_pruning,
    pruned_placeholder_problem,
)

TEXT, TS, VS, VE, IMG, VID = 50, 60, 4, 5, 6, 7  # token ids (TS: timestamp text)
D = 8  # embedding width


@dataclass
class Prompt:
    """A prompt built unpruned and pruned side by side."""

    full: list[int] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)
    to_full: list[int] = field(default_factory=list)  # pruned index -> unpruned index
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # item -> row blocks

    def text(self, ids: list[int]) -> None:
        for tok in ids:
            self.to_full.append(len(self.full))
            self.full.append(tok)
            self.pruned.append(tok)

    def pads(self, tok: int, n: int, keep: torch.Tensor | None) -> None:
        kept = torch.arange(n) if keep is None else keep
        self.to_full.extend(len(self.full) + int(k) for k in kept)
        self.full.extend([tok] * n)
        self.pruned.extend([tok] * len(kept))


def runner_for(model, prompt: list[int], features, encoder_cache, positions):
    """A stand-in holding what `GPUModelRunner._gather_mm_embeddings` reads of a runner."""
    request = SimpleNamespace(
        num_computed_tokens=0,
        mm_features=features,
        prompt_token_ids=prompt,
        mrope_positions=positions.clone(),
        mrope_position_delta=None,
    )
    return SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=["req"]),
        requests={"req": request},
        is_multimodal_pruning_enabled=True,
        uses_mrope=True,
        model=model,
        _get_encoder_output_from_cache=encoder_cache.get,
        _calc_mrope_positions=lambda scheduler_output: None,
        mrope_positions=SimpleNamespace(copy_to_gpu=lambda n: None),
    )


def prefill_in_chunks(runner, chunk: int, start: int = 0, model_runner: str = "v1"):
    """Schedule the prompt in chunks as the runner would; yields (window, embeds, is_mm).

    v1: vLLM's `GPUModelRunner._gather_mm_embeddings` (it calls the hook and stores the
    positions in the request state). v2: the same gather without its hook, then Model
    Runner V2's `MultiModalPruner.recompute` (vllm/v1/worker/gpu), which calls the hook
    and stores the positions through its rope state (a stand-in here); its positions are
    mirrored into the request state for the checks.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    request = runner.requests["req"]
    length = len(request.prompt_token_ids)
    request.num_computed_tokens = start
    if model_runner == "v2":
        from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

        runner.is_multimodal_pruning_enabled = False
        rope = SimpleNamespace(positions=request.mrope_positions.clone().int(), delta=None)

        def update(req_idx, positions, delta):
            rope.positions[:, : positions.shape[1]].copy_(positions)
            rope.delta = delta

        rope.read_prefill_positions = lambda req_idx, n: rope.positions[:, :n]
        rope.update_prefill_positions = update
        cache = SimpleNamespace(mm_features={"req": request.mm_features})
        pruner = MultiModalPruner(runner.model, rope, cache, inputs_embeds_size=D)
        tokens = SimpleNamespace(gpu=torch.tensor([request.prompt_token_ids]))
    while request.num_computed_tokens < length:
        n = min(chunk, length - request.num_computed_tokens)
        out = SimpleNamespace(total_num_scheduled_tokens=n, num_scheduled_tokens={"req": n})
        embeds, is_mm = GPUModelRunner._gather_mm_embeddings(runner, out)
        if model_runner == "v2" and embeds:
            batch = SimpleNamespace(
                req_ids=["req"],
                idx_mapping_np=np.array([0]),
                prefill_len_np=np.array([length]),
                num_computed_prefill_tokens_np=np.array([request.num_computed_tokens]),
                num_scheduled_tokens=np.array([n]),
            )
            embeds = pruner.recompute(embeds, batch, SimpleNamespace(all_token_ids=tokens))
            request.mrope_positions = rope.positions.long()
            request.mrope_position_delta = rope.delta
        yield slice(request.num_computed_tokens, request.num_computed_tokens + n), embeds, is_mm
        request.num_computed_tokens += n


def hook_model(row_width: int = D):
    """The plugin's hook on an object holding only what the hook reads."""
    from vllm_script.models.qwen_vl import QwenModelMixin

    class HookOnly(QwenModelMixin):
        pass

    model = HookOnly()
    model._script_user_evs = None
    model._script_row_width = row_width
    model._script_position_limit = 1 << 20
    model.config = SimpleNamespace(image_token_id=IMG, video_token_id=VID)
    return model


def feature(modality, identifier, offset, length, is_embed=None, grid=None):
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    data = None
    if grid is not None:
        data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(grid))}
    mask = None if is_embed is None else torch.tensor(is_embed)
    position = PlaceholderRange(offset=offset, length=length, is_embed=mask)
    return MultiModalFeatureSpec(
        data=data, modality=modality, identifier=identifier, mm_position=position
    )


def random_keep(gen, n: int, k: int) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:k].sort().values


# ---------------------------------------------------------------- Qwen2.5-VL ------------


def qwen2_5_scenario():
    """Text, a pruned image, text, a pruned video (t_factor 2), an unpruned image, text."""
    gen = torch.Generator().manual_seed(0)
    items = [  # (modality, pad id, grid, t_factor, kept or None)
        ("image", IMG, (1, 4, 6), 1.0, 7),
        ("video", VID, (2, 2, 4), 2.0, 5),
        ("image", IMG, (1, 2, 2), 1.0, None),
    ]
    p, spans_full, spans, features, cache = Prompt(), [], [], [], {}
    for i, (modality, pad, grid, t_factor, k) in enumerate(items):
        p.text([TEXT] * (5 if i == 0 else 3) + [VS])
        n = grid[0] * grid[1] * grid[2]
        keep = None if k is None else random_keep(gen, n, k)
        spans_full.append(MediaSpan(len(p.full), grid, t_factor))
        spans.append(MediaSpan(len(p.pruned), grid, t_factor, kept=k))
        features.append(feature(modality, f"h{i}", len(p.pruned), n if k is None else k))
        rows = torch.randn(n if k is None else k, D).to(torch.bfloat16)
        p.rows[f"h{i}"] = [rows]
        cache[f"h{i}"] = (
            rows if keep is None else encode_offsets(rows, kept_offsets(grid, t_factor, keep))
        )
        p.pads(pad, n, keep)
        p.text([VE])
    p.text([TEXT] * 4)
    return p, spans_full, spans, features, cache


def vllm_qwen2_5_positions(length: int, spans: list[MediaSpan]):
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    fake = SimpleNamespace(
        iter_mm_grid_thw=lambda _: ((s.offset, *s.grid, s.t_factor) for s in spans)
    )
    return Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(fake, [0] * length, [])


RUNNERS = pytest.mark.parametrize("model_runner", ["v1", "v2"])


@RUNNERS
@pytest.mark.parametrize("chunk", [1000, 1, 3, 8, 13], ids=lambda c: f"chunk{c}")
def test_qwen2_5_hook_gives_kept_tokens_their_unpruned_positions(chunk, model_runner):
    p, spans_full, spans, features, cache = qwen2_5_scenario()
    full, full_delta = vllm_qwen2_5_positions(len(p.full), spans_full)
    expected = full.long()[:, p.to_full]
    expected_delta = full_delta + len(p.full) - len(p.pruned)
    step1, delta = mrope_positions_with_pruning(len(p.pruned), spans)
    assert delta == expected_delta

    runner = runner_for(hook_model(), p.pruned, features, cache, step1)
    request = runner.requests["req"]
    seen_rows = []
    for window, embeds, is_mm in prefill_in_chunks(runner, chunk, model_runner=model_runner):
        # what the runner copies to its position buffer for this chunk
        assert torch.equal(request.mrope_positions[:, window], expected[:, window])
        if embeds or model_runner == "v1":  # v2 calls the hook only with media
            assert request.mrope_position_delta == expected_delta
        assert all(e.shape[1] == D for e in embeds)  # offset channels stripped
        assert int(is_mm.sum()) == sum(e.shape[0] for e in embeds)
        seen_rows.extend(embeds)
    want = torch.cat([r for rows in p.rows.values() for r in rows])
    assert torch.equal(torch.cat(seen_rows), want)
    assert torch.equal(request.mrope_positions, expected)


def test_hook_is_idempotent_and_leaves_text_only_requests_alone():
    p, _, spans, features, cache = qwen2_5_scenario()
    step1, _ = mrope_positions_with_pruning(len(p.pruned), spans)
    runner = runner_for(hook_model(), p.pruned, features, cache, step1)
    list(prefill_in_chunks(runner, 9))
    done = runner.requests["req"].mrope_positions.clone()
    again = runner_for(hook_model(), p.pruned, features, cache, done)
    list(prefill_in_chunks(again, 9))
    assert torch.equal(again.requests["req"].mrope_positions, done)

    text = list(range(20, 32))
    plain, plain_delta = mrope_positions_with_pruning(len(text), [])
    model = hook_model()
    rows, positions, delta = model.recompute_mrope_positions(
        input_ids=text, multimodal_embeddings=[], mrope_positions=plain, num_computed_tokens=4
    )
    assert rows == [] and positions is plain and delta == plain_delta


def test_hook_mid_item_with_a_prefix_cache_hit():
    # the first chunk starts inside the pruned image (its first tokens were cached)
    p, spans_full, spans, features, cache = qwen2_5_scenario()
    full, _ = vllm_qwen2_5_positions(len(p.full), spans_full)
    expected = full.long()[:, p.to_full]
    step1, _ = mrope_positions_with_pruning(len(p.pruned), spans)
    runner = runner_for(hook_model(), p.pruned, features, cache, step1)
    start = spans[0].offset + 3
    for window, _, _ in prefill_in_chunks(runner, 5, start=start):
        assert torch.equal(runner.requests["req"].mrope_positions[:, window], expected[:, window])


# ---------------------------------------------------------------- Qwen3-VL --------------


def qwen3_scenario(budget: int):
    """Text, a pruned image (1, 3, 4), text, a video of 4 frames (2 x 3 each) whose
    budget is spread over its frames, each frame after its timestamp text, text."""
    gen = torch.Generator().manual_seed(1)
    p, features, cache = Prompt(), [], {}
    full_features = []
    p.text([TEXT] * 4 + [VS])
    keep = random_keep(gen, 12, 5)
    rows = torch.randn(5, D).to(torch.bfloat16)
    full_features.append(feature("image", "img", len(p.full), 12, grid=[1, 3, 4]))
    features.append(feature("image", "img", len(p.pruned), 5, grid=[1, 3, 4]))
    cache["img"] = encode_offsets(rows, kept_offsets((1, 3, 4), 1.0, keep))
    p.rows["img"] = [rows]
    p.pads(IMG, 12, keep)
    p.text([VE] + [TEXT] * 2)

    frames, h, w = 4, 2, 3
    counts = frame_counts(budget, frames)
    full_start, start = len(p.full), len(p.pruned)
    full_mask, mask, blocks, offsets = [], [], [], []
    for k in counts:
        p.text([TS] * 3 + [VS])
        full_mask += [False] * 4 + [True] * (h * w) + [False]
        mask += [False] * 4 + [True] * k + [False]
        frame_keep = random_keep(gen, h * w, k)
        blocks.append(torch.randn(k, D).to(torch.bfloat16))
        offsets.append(kept_offsets((1, h, w), 1.0, frame_keep))
        p.pads(VID, h * w, frame_keep)
        p.text([VE])
    p.rows["vid"] = blocks
    cache["vid"] = encode_offsets(torch.cat(blocks), torch.cat(offsets))
    full_features.append(
        feature("video", "vid", full_start, len(full_mask), full_mask, [frames, h, w])
    )
    features.append(feature("video", "vid", start, len(mask), mask, [frames, h, w]))
    p.text([TEXT] * 3)
    return p, full_features, features, cache


def vllm_qwen3_positions(tokens: list[int], features):
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    config = SimpleNamespace(
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
        vision_config=SimpleNamespace(spatial_merge_size=1),
    )
    return Qwen3VLForConditionalGeneration._get_mrope_input_positions(tokens, features, config)


@RUNNERS
@pytest.mark.parametrize("budget", [7, 3, 24], ids=["budget7", "budget3-lt-frames", "unpruned"])
@pytest.mark.parametrize("chunk", [1000, 2, 11], ids=lambda c: f"chunk{c}")
def test_qwen3_video_frames_and_timestamps_keep_their_positions(budget, chunk, model_runner):
    from vllm_script.models.qwen3_vl import media_spans

    p, full_features, features, cache = qwen3_scenario(budget)
    full, full_delta = vllm_qwen3_positions(p.full, full_features)
    expected = full.long()[:, p.to_full]
    expected_delta = full_delta + len(p.full) - len(p.pruned)

    items = [
        (
            f.modality,
            f.mm_position.offset,
            f.mm_position.length,
            tuple(f.data[f"{f.modality}_grid_thw"].data.tolist()),
            f.mm_position.get_num_embeds(),
        )
        for f in features
    ]
    spans = media_spans(p.pruned, items, VS)
    step1, delta = mrope_positions_with_pruning(len(p.pruned), spans)
    assert delta == expected_delta

    runner = runner_for(hook_model(), p.pruned, features, cache, step1)
    request = runner.requests["req"]
    for window, embeds, _ in prefill_in_chunks(runner, chunk, model_runner=model_runner):
        assert torch.equal(request.mrope_positions[:, window], expected[:, window])
        if embeds or model_runner == "v1":
            assert request.mrope_position_delta == expected_delta
    assert torch.equal(request.mrope_positions, expected)


# ---------------------------------------------------------------- rules -----------------


@pytest.mark.parametrize("kept, frames", [(7, 4), (2, 8), (8, 8), (0, 3), (64, 4), (1, 1)])
def test_frame_counts_spread_the_budget_evenly(kept, frames):
    counts = frame_counts(kept, frames)
    assert len(counts) == frames and sum(counts) == kept
    assert set(counts) <= {kept // frames, -(-kept // frames)}
    # the frames with the larger share are spread over the video, last one included
    larger = [f for f, c in enumerate(counts) if c > kept // frames]
    if larger:
        assert larger[-1] == frames - 1
        assert all(b - a >= frames // len(larger) for a, b in zip(larger, larger[1:], strict=False))


def test_frame_counts_examples():
    assert frame_counts(7, 4) == [1, 2, 2, 2]
    assert frame_counts(2, 8) == [0, 0, 0, 1, 0, 0, 0, 1]
    assert frame_counts(12, 4) == [3, 3, 3, 3]


@pytest.mark.parametrize(
    "length, runs, problem",
    [
        (10, [(2, [True] * 3), (6, [True] * 2)], None),
        (10, [(2, [True] * 3), (5, [True] * 2)], "adjacent"),
        (10, [(7, [True] * 3)], "ends with"),
        (12, [(1, [False, True, True, False, False, True, False])], None),
        (8, [(0, [True] * 2)], None),  # a placeholder may open the prompt
    ],
    ids=["separated", "adjacent", "ends-with-media", "frames-with-text", "at-start"],
)
def test_placeholders_that_cannot_carry_pruned_positions(length, runs, problem):
    found = pruned_placeholder_problem(length, runs)
    assert (found is None) if problem is None else (problem in found)


def test_with_vllms_evs_on_the_model_defers_to_the_in_tree_positions():
    # a server with --video-pruning-rate (and no 'script' setting) keeps vLLM's EVS:
    # its prompts and positions are vLLM's, the plugin's position code stays out
    from vllm_script.models.qwen_vl import QwenModelMixin

    calls = []

    class InTree:
        def get_mrope_input_positions(self, input_tokens, mm_features):
            calls.append("positions")
            return "in-tree positions"

        def recompute_mrope_positions(self, **kwargs):
            calls.append("hook")
            return "in-tree hook"

    class Model(QwenModelMixin, InTree):
        pass

    model = hook_model()
    model.__class__ = Model
    model._script_user_evs = 0.5
    assert model.get_mrope_input_positions([1, 2], []) == "in-tree positions"
    hook = model.recompute_mrope_positions([1, 2], [], torch.zeros(3, 2), 0)
    assert hook == "in-tree hook" and calls == ["positions", "hook"]


@pytest.mark.parametrize(
    "spans",
    [[MediaSpan(4, (3, 2, 5), 2.0)], [MediaSpan(0, (1, 6, 2))], [MediaSpan(2, (2, 4, 4), 0.5)]],
    ids=["video-ends-prompt", "image-is-prompt", "slow-video-ends-prompt"],
)
def test_hook_decoding_offset_equals_vllms_for_unpruned_media_at_the_end(spans):
    length = spans[-1].offset + spans[-1].num_tokens
    positions, delta = vllm_qwen2_5_positions(length, spans)
    *_, hook_delta = hook_model().recompute_mrope_positions(
        input_ids=[TEXT] * length,
        multimodal_embeddings=[],
        mrope_positions=positions.long(),
        num_computed_tokens=length,
    )
    assert hook_delta == delta
