"""Qwen2.5-VL (images and video, M-RoPE) end to end on the CPU backend, tiny checkpoint.

The module's engine prefills in chunks of 8 tokens, fewer than the budget (10), so every
pruned item's placeholders are split across prefill chunks; the fresh reference engines
prefill in one chunk.
"""

from __future__ import annotations

import os

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

from vllm_script.config import ScriptSettings, kept_count

pytestmark = pytest.mark.e2e

SERVER = {"method": "script", "budget": 10}
ENGINE = {**ENGINE_KWARGS, "max_model_len": 4096, "limit_mm_per_prompt": {"image": 2, "video": 1}}
CHUNKED = {**ENGINE, "max_num_batched_tokens": 8, "enable_chunked_prefill": True}
IMAGES = [[1, 112, 112], [2, 224, 112], [3, 300, 180]]
VIDEOS = [[7, 4], [8, 8]]
Q = "what is in the image?"
OFF = {"script": {"method": "none"}}


def req(images=(), videos=(), kw=None, question=Q):
    r = {"template": "qwen", "question": question, "images": list(images), "videos": list(videos)}
    if kw is not None:
        r["mm_processor_kwargs"] = kw
    return r


COMPARE = [req([s]) for s in IMAGES] + [req(videos=[VIDEOS[0]]), req([IMAGES[0], IMAGES[2]])]


@pytest.fixture(scope="module")
def llm(tiny_qwen):
    os.environ["VLLM_SCRIPT_RECORD_SELECTIONS"] = "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM

    engine = LLM(model=str(tiny_qwen), hf_overrides={"script": SERVER}, **CHUNKED)
    yield engine
    del engine


@pytest.mark.parametrize(
    "media",
    [{"images": [s]} for s in IMAGES] + [{"videos": [v]} for v in VIDEOS],
    ids=["img112x112", "img224x112", "img300x180", "video4f", "video8f"],
)
def test_prompt_tokens_follow_the_count_rule(llm, media):
    text, off, on = run_requests(llm, [req(), req(**media, kw=OFF), req(**media)])
    n = off["prompt_len"] - text["prompt_len"]  # the vision_start/end tags are in both
    assert n > 2
    n -= 2  # <|vision_start|> and <|vision_end|> around the pads
    assert on["prompt_len"] == off["prompt_len"] - n + kept_count(n, ScriptSettings(**SERVER))


def test_kept_tokens_keep_their_original_positions(llm, tiny_qwen):
    import torch
    from transformers import AutoProcessor, AutoTokenizer

    from vllm_script.models.mrope import grid_offsets
    from vllm_script.pruning import recent_selections
    from vllm_script.testing import random_image

    before = len(llm.collective_rpc(recent_selections)[0])
    result = run_requests(llm, [req([IMAGES[2]], question="which color is the car?")])[0]
    assert "error" not in result
    new = llm.collective_rpc(recent_selections)[0][before:]
    selection = next(r for r in new if "keep" in r)
    chunks = [r["positions"] for r in new if r.get("kind") == "positions"]
    positions = [p for chunk in chunks for p in chunk]
    assert len(chunks) >= 2  # the kept tokens were split across prefill chunks

    grid = AutoProcessor.from_pretrained(tiny_qwen).image_processor(
        images=[random_image(*IMAGES[2])], return_tensors="pt"
    )["image_grid_thw"][0]
    t, h, w = int(grid[0]), int(grid[1]) // 2, int(grid[2]) // 2
    start = len(
        AutoTokenizer.from_pretrained(tiny_qwen).encode("<|im_start|>user <|vision_start|>")
    )
    expected = (grid_offsets((t, h, w))[:, selection["keep"]] + start).T.tolist()
    assert len(selection["keep"]) == SERVER["budget"]
    assert positions == expected
    # the pruned selection is not a prefix of the grid: positions really are scattered
    assert torch.tensor(selection["keep"]).diff().max() > 1


def test_chunked_and_unconfigured_match_unchunked_and_vanilla(llm, tiny_qwen):
    vanilla = run_in_fresh_engine(tiny_qwen, COMPARE, plugins=False, engine_kwargs=ENGINE)
    per_request = [{**r, "mm_processor_kwargs": {"script": SERVER}} for r in COMPARE]
    unconfigured = run_in_fresh_engine(tiny_qwen, COMPARE + per_request, engine_kwargs=ENGINE)
    plain, unchunked_pruned = unconfigured[: len(COMPARE)], unconfigured[len(COMPARE) :]
    big = [{**r, "mm_processor_kwargs": {"script": {"budget": 100_000}}} for r in COMPARE]
    assert answers(plain) == answers(vanilla)
    assert answers(run_requests(llm, big)) == answers(vanilla)
    # prefilled in chunks of 8 (K = 10 placeholders per item split) = in one chunk
    assert answers(run_requests(llm, COMPARE)) == answers(unchunked_pruned)


def test_gpu_runner_hook_gives_the_same_answers_and_positions(llm, tiny_qwen):
    from transformers import AutoConfig

    assert llm.collective_rpc(runner_hook_state)[0] == {
        "gpu_runner_calls_hook": True,
        "in_tree_evs": False,
        "this_runner_calls_hook": False,
        "position_limit": 4 * 8192,  # rows of the rotary table (max_position_embeddings 8192)
    }
    pad = AutoConfig.from_pretrained(tiny_qwen).video_token_id
    video = req(videos=[VIDEOS[1]])
    before = len(_records(llm))
    forward = run_requests(llm, [video])
    forward_slots = [
        p for r in _records(llm)[before:] if r.get("kind") == "positions" for p in r["positions"]
    ]
    llm.collective_rpc(set_runner_hook(True))  # the GPU runner's code path, here
    try:
        before = len(_records(llm))
        hooked = run_requests(llm, [video])
        new = _records(llm)[before:]
    finally:
        llm.collective_rpc(set_runner_hook(False))
    assert answers(hooked) == answers(forward)
    assert not [r for r in new if r.get("kind") == "positions"]  # not shifted twice
    hook = [r["positions"] for r in new if r.get("kind") == "hook_positions"][-1]
    prompt = llm.generate(make_prompt(video), use_tqdm=False)[0].prompt_token_ids
    slots = [i for i, x in enumerate(prompt) if x == pad]
    assert len(slots) == len(forward_slots) == SERVER["budget"]
    assert [hook[i] for i in slots] == forward_slots


def _records(llm) -> list[dict]:
    from vllm_script.pruning import recent_selections

    return llm.collective_rpc(recent_selections)[0]


def test_video_pruning_rate_and_script_refuse_to_start_together(tiny_qwen):
    with pytest.raises(RuntimeError, match="cannot be combined with --video-pruning-rate"):
        run_in_fresh_engine(
            tiny_qwen,
            [req()],
            engine_kwargs={**ENGINE, "hf_overrides": {"script": SERVER}, "video_pruning_rate": 0.5},
            timeout=300,
        )
