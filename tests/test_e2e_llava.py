"""End to end on vLLM's CPU backend with the tiny LLaVA-1.5-shaped checkpoint.

One engine (plugin on, server-wide Script budget 64, prefix caching on) is shared by the
module; reference answers come from fresh engines in separate processes, vanilla vLLM
among them.
"""

from __future__ import annotations

import os

import pytest
from engine_utils import ENGINE_KWARGS, answers, run_in_fresh_engine, run_requests

pytestmark = pytest.mark.e2e

N = 576  # visual tokens per image of the tiny checkpoint
SERVER = {"method": "script", "budget": 64}
QUESTIONS = ["what is in the image?", "how many people are there?", "which color is the car?"]


@pytest.fixture(scope="module")
def llm(tiny_llava):
    os.environ["VLLM_SCRIPT_RECORD_SELECTIONS"] = "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    from vllm import LLM

    engine = LLM(
        model=str(tiny_llava),
        hf_overrides={"script": SERVER},
        enable_prefix_caching=True,
        **ENGINE_KWARGS,
    )
    yield engine
    del engine


@pytest.fixture(scope="module")
def vanilla(tiny_llava):
    """Vanilla vLLM (plugin not loaded) on the comparison requests."""
    return run_in_fresh_engine(tiny_llava, COMPARE, plugins=False)


COMPARE = [{"question": q, "images": [i]} for i, q in enumerate(QUESTIONS)] + [
    {"question": QUESTIONS[0], "images": [3, 4]},
    {"question": "tell me about the sky", "images": []},
]


def _recent(llm) -> list[dict]:
    from vllm_script.pruning import recent_selections

    return llm.collective_rpc(recent_selections)[0]


def test_one_image_drops_exactly_n_minus_k(llm):
    off, on = run_requests(
        llm,
        [
            {
                "question": QUESTIONS[0],
                "images": [11],
                "mm_processor_kwargs": {"script": {"method": "none"}},
            },
            {"question": QUESTIONS[0], "images": [11]},
        ],
    )
    assert off["prompt_len"] - on["prompt_len"] == N - SERVER["budget"]


def test_two_images_drop_exactly_n_minus_k_each(llm):
    off, on = run_requests(
        llm,
        [
            {
                "question": QUESTIONS[1],
                "images": [12, 13],
                "mm_processor_kwargs": {"script": {"method": "none"}},
            },
            {"question": QUESTIONS[1], "images": [12, 13]},
        ],
    )
    assert off["prompt_len"] - on["prompt_len"] == 2 * (N - SERVER["budget"])


def test_per_request_budget_overrides_server(llm):
    base, wide = run_requests(
        llm,
        [
            {"question": QUESTIONS[2], "images": [14]},
            {
                "question": QUESTIONS[2],
                "images": [14],
                "mm_processor_kwargs": {"script": {"budget": 128}},
            },
        ],
    )
    assert wide["prompt_len"] - base["prompt_len"] == 128 - SERVER["budget"]


@pytest.mark.parametrize("budget", [N, 1000], ids=["budget=N", "budget>N"])
def test_budget_at_least_n_is_token_identical_to_vanilla(llm, vanilla, budget):
    requests = [{**r, "mm_processor_kwargs": {"script": {"budget": budget}}} for r in COMPARE]
    assert answers(run_requests(llm, requests)) == answers(vanilla)


def test_unconfigured_plugin_is_token_identical_to_vanilla(tiny_llava, vanilla):
    plugin_no_settings = run_in_fresh_engine(tiny_llava, COMPARE, plugins=True)
    assert answers(plugin_no_settings) == answers(vanilla)
    assert vanilla[0]["prompt_len"] > N  # the image really was in the prompt, unpruned


def test_negative_control_another_selection_changes_the_answers(llm, vanilla):
    """The token-identity tests compare six greedy tokens of a random 2-layer model; they
    prove something only because another selection gives other tokens: dropping a single
    token, or keeping another 64 tokens, changes the answers."""
    with_image = [i for i, r in enumerate(COMPARE) if r["images"]]

    def tokens(results):
        return [tokens for i, (_, tokens) in enumerate(answers(results)) if i in with_image]

    def served(**settings):
        return tokens(run_requests(llm, [{**r, "mm_processor_kwargs": {"script": settings}}
                                         for r in COMPARE]))  # fmt: skip

    assert served(method="uniform", budget=N - 1) != tokens(vanilla)
    assert served(method="uniform", budget=64) != served(method="divprune", budget=64)


def test_chunked_prefill_gives_the_same_answers(llm, tiny_llava):
    # prefill chunks of 32 tokens split each image's 64 kept placeholders in two or more
    chunked = run_in_fresh_engine(
        tiny_llava,
        COMPARE,
        engine_kwargs={
            "hf_overrides": {"script": SERVER},
            "max_num_batched_tokens": 32,
            "enable_chunked_prefill": True,
        },
    )
    assert answers(chunked) == answers(run_requests(llm, COMPARE))


def test_questions_get_their_own_selection_and_cache_entries(llm, tiny_llava):
    # budget 200 > one 128-token KV block, so the image's first block is cacheable: a
    # selection made for one question would be reused for the other if the question
    # were not part of the multimodal hash.
    kw = {"script": {"budget": 200}}
    requests = [
        {"question": QUESTIONS[0], "images": [21], "mm_processor_kwargs": kw},
        {"question": QUESTIONS[1], "images": [21], "mm_processor_kwargs": kw},
        {"question": QUESTIONS[0], "images": [21], "mm_processor_kwargs": kw},
        {"question": QUESTIONS[1], "images": [21], "mm_processor_kwargs": kw},
    ]
    before = len(_recent(llm))
    served = run_requests(llm, requests)
    first, second = _recent(llm)[before : before + 2]
    assert first["kept"] == second["kept"] == 200
    assert first["query"] != second["query"]
    assert first["keep"] != second["keep"], "two questions about one image chose the same tokens"
    assert served[2]["cached"] >= 128, "the repeated question should hit the prefix cache"
    assert served[1]["cached"] < 128, "another question must not reuse the image's KV blocks"
    fresh = run_in_fresh_engine(
        tiny_llava, requests[:2], engine_kwargs={"hf_overrides": {"script": SERVER}}
    )
    assert [s["tokens"] for s in served] == [f["tokens"] for f in fresh + fresh]


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"budget": 0}, "script.budget"),
        ({"budget": "64"}, "script.budget"),
        ({"method": "bogus"}, "script.method"),
        ({"colour": 1}, "script.colour"),
        ({"max_budget": 10}, "script.max_budget"),
        ("not json", "not valid JSON"),
    ],
    ids=["budget=0", "budget-str", "unknown-method", "unknown-key", "server-only-key", "bad-json"],
)
def test_invalid_request_fails_alone(llm, bad, named):
    bad_result, good_result = run_requests(
        llm,
        [
            {"question": QUESTIONS[0], "images": [31], "mm_processor_kwargs": {"script": bad}},
            {"question": QUESTIONS[0], "images": [31]},
        ],
    )
    assert "error" in bad_result and named in bad_result["error"], bad_result
    assert "error" not in good_result and len(good_result["tokens"]) > 0


def test_bad_server_settings_refuse_to_start(tiny_llava):
    with pytest.raises(RuntimeError, match=r"script\.budget"):
        run_in_fresh_engine(
            tiny_llava,
            [{"question": "hi", "images": []}],
            engine_kwargs={"hf_overrides": {"script": {"budget": -1}}},
            timeout=300,
        )
