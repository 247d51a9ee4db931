"""LLaVA-NeXT (any resolution) end to end on the CPU backend, tiny checkpoint."""

from __future__ import annotations

import pytest
from engine_utils import ENGINE_KWARGS, answers, run_in_fresh_engine, run_requests

from vllm_script.config import ScriptSettings, kept_count

pytestmark = pytest.mark.e2e

SERVER = {"method": "script", "budget": 40}
SIZES = [[1, 112, 112], [2, 224, 112], [3, 300, 180], [4, 224, 224]]
ENGINE = {**ENGINE_KWARGS, "max_model_len": 4096}
COMPARE = [{"question": "what is in the image?", "images": [s]} for s in SIZES] + [
    {"question": "how many people are there?", "images": [SIZES[0], SIZES[3]]},
]
OFF = {"script": {"method": "none"}}


@pytest.fixture(scope="module")
def llm(tiny_llava_next):
    from vllm import LLM

    engine = LLM(model=str(tiny_llava_next), hf_overrides={"script": SERVER}, **ENGINE)
    yield engine
    del engine


def test_prompt_tokens_follow_the_count_rule_per_image_size(llm):
    text = run_requests(llm, [{"question": "what is in the image?", "images": []}])[0]
    sizes = {}
    for size in SIZES:
        off, on, wide = run_requests(
            llm,
            [
                {"question": "what is in the image?", "images": [size], "mm_processor_kwargs": OFF},
                {"question": "what is in the image?", "images": [size]},
                {
                    "question": "what is in the image?",
                    "images": [size],
                    "mm_processor_kwargs": {"script": {"budget": 150}},
                },
            ],
        )
        n = off["prompt_len"] - text["prompt_len"]  # the <image> tag became N tokens
        sizes[tuple(size[1:])] = n
        assert on["prompt_len"] == off["prompt_len"] - n + kept_count(n, ScriptSettings(**SERVER))
        assert wide["prompt_len"] == off["prompt_len"] - n + kept_count(
            n, ScriptSettings(budget=150)
        )
    assert len(set(sizes.values())) == len(SIZES), f"sizes should give different N: {sizes}"


def test_two_images_of_different_sizes_in_one_prompt(llm):
    both = {"question": "how many people are there?", "images": [SIZES[0], SIZES[3]]}
    off, on = run_requests(llm, [{**both, "mm_processor_kwargs": OFF}, both])
    singles = run_requests(
        llm,
        [
            {"question": "x", "images": [SIZES[0]], "mm_processor_kwargs": OFF},
            {"question": "x", "images": [SIZES[0]]},
            {"question": "x", "images": [SIZES[3]], "mm_processor_kwargs": OFF},
            {"question": "x", "images": [SIZES[3]]},
        ],
    )
    saved = (singles[0]["prompt_len"] - singles[1]["prompt_len"]) + (
        singles[2]["prompt_len"] - singles[3]["prompt_len"]
    )
    assert off["prompt_len"] - on["prompt_len"] == saved > 0


def test_vision_space_methods_are_refused_per_request(llm):
    bad, good = run_requests(
        llm,
        [
            {"question": "x", "images": [5], "mm_processor_kwargs": {"script": {"method": "trim"}}},
            {"question": "x", "images": [5]},
        ],
    )
    assert "'script.method': 'trim'" in bad["error"] and "LlavaNext supports" in bad["error"]
    assert "error" not in good


def test_budget_at_least_n_and_unconfigured_match_vanilla(llm, tiny_llava_next):
    vanilla = run_in_fresh_engine(tiny_llava_next, COMPARE, plugins=False, engine_kwargs=ENGINE)
    unconfigured = run_in_fresh_engine(tiny_llava_next, COMPARE, engine_kwargs=ENGINE)
    big = [{**r, "mm_processor_kwargs": {"script": {"budget": 100_000}}} for r in COMPARE]
    assert answers(unconfigured) == answers(vanilla)
    assert answers(run_requests(llm, big)) == answers(vanilla)
