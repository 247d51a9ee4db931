"""Qwen3-VL (images, videos with timestamp text, deepstack) end to end on the CPU backend.

The module's engine prefills in chunks of 8 tokens, fewer than the budget (10), so every
pruned item's placeholders are split across prefill chunks. References come from fresh
engines that prefill in one chunk: vanilla vLLM, and the plugin unconfigured (whose
requests with per-request settings give the unchunked pruned answers). Positions are
compared with vLLM's own Qwen3-VL position code on the unpruned prompt.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from engine_utils import (
    ENGINE_KWARGS,
    answers,
    make_prompt,
    run_in_fresh_engine,
    run_requests,
    runner_hook_state,
    set_runner_hook,
)

from vllm_script.config import ScriptSettings, frame_counts, kept_count

pytestmark = pytest.mark.e2e

SERVER = {"method": "script", "budget": 10}
BASE = {**ENGINE_KWARGS, "max_model_len": 4096, "limit_mm_per_prompt": {"image": 2, "video": 1}}
CHUNKED = {**BASE, "max_num_batched_tokens": 8, "enable_chunked_prefill": True}
IMAGES = [[1, 112, 112], [2, 224, 112], [3, 300, 180]]
VIDEOS = [[7, 4], [8, 8]]
Q = "what is in the image?"
OFF = {"script": {"method": "none"}}
METHODS = ["script", "gsp", "qcsp", "divprune", "uniform"]


def req(images=(), videos=(), kw=None, question=Q):
    r = {"template": "qwen", "question": question, "images": list(images), "videos": list(videos)}
    if kw is not None:
        r["mm_processor_kwargs"] = kw
    return r


COMPARE = [req([IMAGES[2]]), req(videos=[VIDEOS[1]]), req([IMAGES[0], IMAGES[1]])]


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    os.environ["VLLM_SCRIPT_RECORD_SELECTIONS"] = "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM

    engine = LLM(model=str(tiny_qwen3), hf_overrides={"script": SERVER}, **CHUNKED)
    yield engine
    del engine


@pytest.fixture(scope="module")
def ids(tiny_qwen3):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_qwen3)
    return SimpleNamespace(
        image=cfg.image_token_id,
        video=cfg.video_token_id,
        start=cfg.vision_start_token_id,
        end=cfg.vision_end_token_id,
        config=cfg,
    )


def prompt_ids(llm, request) -> list[int]:
    from vllm import SamplingParams

    out = llm.generate(make_prompt(request), SamplingParams(max_tokens=1), use_tqdm=False)
    return list(out[0].prompt_token_ids)


def records(llm, since: int = 0) -> list[dict]:
    from vllm_script.pruning import recent_selections

    return llm.collective_rpc(recent_selections)[0][since:]


def frame_pad_counts(tokens: list[int], ids) -> list[int]:
    """Pads of each video frame: a frame's <|vision_start|> is followed by pads or its end."""
    counts = []
    for i, tok in enumerate(tokens[:-1]):
        if tok == ids.start and tokens[i + 1] in (ids.video, ids.end):
            j = i + 1
            while tokens[j] == ids.video:
                j += 1
            counts.append(j - i - 1)
    return counts


def hf_grid(tiny, media: dict):
    """(T, H, W) in patches from the HF processor (independent of vLLM and the plugin)."""
    from transformers import AutoProcessor

    from vllm_script.testing import random_image, random_video

    proc = AutoProcessor.from_pretrained(tiny)
    if media.get("images"):
        out = proc.image_processor(images=[random_image(*media["images"][0])], return_tensors="pt")
        return [int(v) for v in out["image_grid_thw"][0]]
    frames, _ = random_video(*media["videos"][0])
    out = proc.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")
    return [int(v) for v in out["video_grid_thw"][0]]


def vllm_positions(tokens: list[int], modality: str, grid, ids):
    """vLLM's own Qwen3-VL positions of an unpruned prompt with one image or video."""
    import torch
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    pad = ids.image if modality == "image" else ids.video
    first = tokens.index(pad)
    if modality == "video":  # the placeholder opens with frame 0's timestamp text
        first = tokens.index(ids.start) + 1
    last = len(tokens) - 1 - tokens[::-1].index(pad)
    feature = MultiModalFeatureSpec(
        data={f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(grid))},
        modality=modality,
        identifier="x",
        mm_position=PlaceholderRange(offset=first, length=last + 2 - first),
    )
    positions, delta = Qwen3VLForConditionalGeneration._get_mrope_input_positions(
        tokens, [feature], ids.config
    )
    return positions.long(), delta


MEDIA = [{"images": [s]} for s in IMAGES] + [{"videos": [v]} for v in VIDEOS]
MEDIA_IDS = ["img112x112", "img224x112", "img300x180", "video4f", "video8f"]


@pytest.mark.parametrize("media", MEDIA, ids=MEDIA_IDS)
def test_prompt_follows_the_count_rule_and_keeps_the_timestamp_text(llm, ids, tiny_qwen3, media):
    off = prompt_ids(llm, req(**media, kw=OFF))
    on = prompt_ids(llm, req(**media))
    pad = ids.image if "images" in media else ids.video
    t, h, w = hf_grid(tiny_qwen3, media)
    n = t * h * w // 4
    k = kept_count(n, ScriptSettings(**SERVER))
    assert off.count(pad) == n and on.count(pad) == k
    # everything but the pads (text, timestamps, vision tags) is unchanged
    assert [x for x in on if x != pad] == [x for x in off if x != pad]
    if "videos" in media:
        assert frame_pad_counts(off, ids) == [h * w // 4] * t
        assert frame_pad_counts(on, ids) == frame_counts(k, t)


@pytest.mark.parametrize("media", [MEDIA[2], MEDIA[4]], ids=["image", "video"])
def test_positions_equal_vllms_unpruned_positions(llm, ids, tiny_qwen3, media):
    modality = "image" if "images" in media else "video"
    pad = ids.image if modality == "image" else ids.video
    question = "which color is the car?"  # a new question: a new selection
    off = prompt_ids(llm, req(**media, kw=OFF, question=question))
    before = len(records(llm))
    on = prompt_ids(llm, req(**media, question=question))
    new = records(llm, before)
    kept = next(r for r in new if r.get("kind") == "kept")["keep"]
    chunks = [r["positions"] for r in new if r.get("kind") == "positions"]
    prompt = next(r for r in new if r.get("kind") == "prompt_positions")["positions"]
    full, _ = vllm_positions(off, modality, hf_grid(tiny_qwen3, media), ids)

    pads = [i for i, x in enumerate(off) if x == pad]
    kept_at = [pads[i] for i in kept]
    assert len(kept_at) == SERVER["budget"] and len(chunks) >= 2  # split across chunks
    # kept tokens, through the forward path chunk after chunk: their unpruned positions
    assert [p for chunk in chunks for p in chunk] == full[:, kept_at].T.tolist()
    # every other token (text, timestamps, vision tags, the text after): vLLM's positions
    others_off = [i for i, x in enumerate(off) if x != pad]
    others_on = [i for i, x in enumerate(on) if x != pad]
    assert [prompt[i] for i in others_on] == full[:, others_off].T.tolist()


def test_chunked_and_unconfigured_match_unchunked_and_vanilla(llm, tiny_qwen3):
    vanilla = run_in_fresh_engine(tiny_qwen3, COMPARE, plugins=False, engine_kwargs=BASE)
    per_request = [{**r, "mm_processor_kwargs": {"script": SERVER}} for r in COMPARE]
    unconfigured = run_in_fresh_engine(tiny_qwen3, COMPARE + per_request, engine_kwargs=BASE)
    plain, unchunked_pruned = unconfigured[: len(COMPARE)], unconfigured[len(COMPARE) :]
    big = [{**r, "mm_processor_kwargs": {"script": {"budget": 100_000}}} for r in COMPARE]
    off = [{**r, "mm_processor_kwargs": OFF} for r in COMPARE]
    assert answers(plain) == answers(vanilla)
    assert answers(run_requests(llm, big)) == answers(vanilla)
    assert answers(run_requests(llm, off)) == answers(vanilla)
    # prefilled in chunks of 8 (K = 10 placeholders per item split) = in one chunk
    assert answers(run_requests(llm, COMPARE)) == answers(unchunked_pruned)


@pytest.mark.parametrize("method", METHODS)
def test_every_llm_space_method_on_images_and_video(llm, tiny_qwen3, method):
    kw = {"script": {"method": method, "budget": 6}}
    requests = [req([IMAGES[2]], kw=OFF), req([IMAGES[2]], kw=kw)]
    requests += [req(videos=[VIDEOS[1]], kw=OFF), req(videos=[VIDEOS[1]], kw=kw)]
    before = len(records(llm))
    image_off, image_on, video_off, video_on = run_requests(llm, requests)
    kept = [r for r in records(llm, before) if r.get("kind") == "kept"]
    assert [len(r["keep"]) for r in kept] == [6, 6]
    # N from the HF processor's grid (2x2 patches per token), not from the plugin's record
    for off, on, media in (
        (image_off, image_on, {"images": [IMAGES[2]]}),
        (video_off, video_on, {"videos": [VIDEOS[1]]}),
    ):
        t, h, w = hf_grid(tiny_qwen3, media)
        assert on["prompt_len"] == off["prompt_len"] - t * h * w // 4 + 6


def test_refused_requests_fail_alone(llm):
    from vllm import SamplingParams

    bad = [
        req([IMAGES[0]], kw={"script": {"method": "trim"}}),
        req([IMAGES[0]], kw={"script": {"method": "prumerge+"}}),
        req([IMAGES[0]], kw={"script": {"relevance": "clip"}}),
    ]
    for r, result in zip(bad, run_requests(llm, bad), strict=True):
        assert "error" in result, r
    # two images whose placeholders touch cannot carry pruned positions
    touching = make_prompt(req([IMAGES[0], IMAGES[1]]))
    touching["prompt"] = touching["prompt"].replace("<|vision_end|><|vision_start|>", "")
    with pytest.raises(ValueError, match="adjacent placeholders"):
        llm.generate(touching, SamplingParams(max_tokens=2), use_tqdm=False)
    assert "error" not in run_requests(llm, [req([IMAGES[0]])])[0]


def test_gpu_runner_hook_gives_the_same_answers_and_positions(llm, ids):
    state = llm.collective_rpc(runner_hook_state)[0]
    # vLLM's GPU runner would call the hook; the in-tree EVS stays off; the CPU runner
    # (this one) never sets its flag, so the forward path served every test above
    assert state == {
        "gpu_runner_calls_hook": True,
        "in_tree_evs": False,
        "this_runner_calls_hook": False,
        "position_limit": 8192,  # rows of the rotary table (max_position_embeddings 8192)
    }
    video = COMPARE[1]
    before = len(records(llm))
    forward = run_requests(llm, [video])
    forward_slots = [
        p for r in records(llm, before) if r.get("kind") == "positions" for p in r["positions"]
    ]
    # the GPU runner's code path, here: its flag on, as GPUModelRunner.load_model sets it
    llm.collective_rpc(set_runner_hook(True))
    try:
        before = len(records(llm))
        hooked = run_requests(llm, [video])
        new = records(llm, before)
    finally:
        llm.collective_rpc(set_runner_hook(False))
    assert answers(hooked) == answers(forward)
    assert not [r for r in new if r.get("kind") == "positions"]  # not shifted twice
    hook = [r["positions"] for r in new if r.get("kind") == "hook_positions"][-1]
    slots = [i for i, x in enumerate(prompt_ids(llm, video)) if x == ids.video]
    assert len(forward_slots) == len(slots) == SERVER["budget"]
    assert [hook[i] for i in slots] == forward_slots


def test_moe_variant_prunes_and_is_vanilla_unpruned(tiny_qwen3_moe):
    requests = [req([IMAGES[2]]), req(videos=[VIDEOS[1]])]
    off = [{**r, "mm_processor_kwargs": OFF} for r in requests]
    vanilla = run_in_fresh_engine(tiny_qwen3_moe, requests, plugins=False, engine_kwargs=BASE)
    configured = {**BASE, "hf_overrides": {"script": SERVER}}
    plugin = run_in_fresh_engine(tiny_qwen3_moe, off + requests, engine_kwargs=configured)
    assert answers(plugin[:2]) == answers(vanilla)
    for media, unpruned, pruned in zip(MEDIA[2:5:2], vanilla, plugin[2:], strict=True):
        t, h, w = hf_grid(tiny_qwen3_moe, media)
        n = t * h * w // 4
        assert pruned["prompt_len"] == unpruned["prompt_len"] - n + SERVER["budget"]
