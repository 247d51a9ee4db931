"""End to end on vLLM's CPU backend: every method through the `script` setting.

One engine is shared by the module: the tiny LLaVA-1.5-shaped checkpoint, server-wide
Script at budget 64 with relevance "llm" and a `clip_path` to a tiny random CLIP
checkpoint (conftest's `clip_dir`, so requests may ask for relevance "clip"). Requests
pick the method, budget and relevance in `mm_processor_kwargs`. Checked: the prompt-token count
(the placeholders the processor emitted == the rows the model returned, or vLLM would
have failed the merge), and the worker's recorded selections (which method really ran,
kept / merged / extra tokens, the question's text for CLIP). Start-up failures with a
bad `clip_path` run in fresh engines.
"""

from __future__ import annotations

import os
import re

import pytest
from engine_utils import (
    ENGINE_KWARGS,
    make_prompt,
    run_in_fresh_engine,
    run_requests,
    vision_width,
)

pytestmark = pytest.mark.e2e

N = 576  # visual tokens per image of the tiny checkpoint (24 x 24)
METHODS = ["script", "gsp", "qcsp", "trim", "prumerge+", "divprune", "uniform"]
BUDGETS = [1, 2, 64, 575, 576]
QUESTION = "which color is the car?"
VISION_SPACE = ("trim", "prumerge+")  # k - 1 kept tokens + 1 extra token


@pytest.fixture(scope="module")
def llm(tiny_llava, clip_dir):
    os.environ["VLLM_SCRIPT_RECORD_SELECTIONS"] = "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    from vllm import LLM

    server = {"method": "script", "budget": 64, "relevance": "llm", "clip_path": str(clip_dir)}
    engine = LLM(model=str(tiny_llava), hf_overrides={"script": server}, **ENGINE_KWARGS)
    yield engine
    del engine


def _request(seeds, **settings) -> dict:
    return {
        "question": QUESTION,
        "images": list(seeds),
        "mm_processor_kwargs": {"script": settings},
    }


def _ok(results: list[dict]) -> list[dict]:
    assert all("error" not in r for r in results), results
    assert all(len(r["tokens"]) > 0 for r in results), results
    return results


@pytest.fixture(scope="module")
def text_len(llm) -> dict[int, int]:
    """Prompt tokens other than the image placeholders, for 1 and 2 images."""
    one, two = _ok(
        run_requests(llm, [_request([1], method="none"), _request([2, 3], method="none")])
    )
    return {1: one["prompt_len"] - N, 2: two["prompt_len"] - 2 * N}


def _recent(llm) -> list[dict]:
    from vllm_script.pruning import recent_selections

    return llm.collective_rpc(recent_selections)[0]


def _check_record(record: dict, method: str, k: int, relevance: str = "llm") -> None:
    assert record["method"] == method and record["kept"] == k and record["num_tokens"] == N
    assert record["relevance"] == relevance
    if method in VISION_SPACE:
        assert record["extra"] == 1 and len(record["keep"]) == k - 1, record
        assert record["merged"] == (method == "prumerge+")
        assert 0 <= record["iqr_count"] <= N
    else:
        assert record["extra"] == 0 and not record["merged"] and len(record["keep"]) == k
    assert record["keep"] == sorted(set(record["keep"])), "kept indices: distinct, ascending"
    assert all(0 <= i < N for i in record["keep"])


@pytest.mark.parametrize("method", METHODS)
def test_one_image_every_budget_keeps_exactly_k(llm, text_len, method):
    base = 100 + 10 * METHODS.index(method)  # fresh images: no encoder-cache reuse
    requests = [_request([base + j], method=method, budget=k) for j, k in enumerate(BUDGETS)]
    before = len(_recent(llm))
    results = _ok(run_requests(llm, requests))
    assert [r["prompt_len"] - text_len[1] for r in results] == [min(k, N) for k in BUDGETS]
    records = _recent(llm)[before:]
    pruned = [k for k in BUDGETS if k < N]
    assert [r["kept"] for r in records] == pruned  # one selection per pruned image
    for record, k in zip(records, pruned, strict=True):
        _check_record(record, method, k)


@pytest.mark.parametrize("budget", [1, 64])
def test_two_images_keep_exactly_k_each(llm, text_len, budget):
    base = 200 if budget == 1 else 250  # fresh images: no encoder-cache reuse
    requests = [
        _request([base + 2 * i, base + 2 * i + 1], method=m, budget=budget)
        for i, m in enumerate(METHODS)
    ]
    before = len(_recent(llm))
    results = _ok(run_requests(llm, requests))
    assert [r["prompt_len"] - text_len[2] for r in results] == [2 * budget] * len(METHODS)
    records = _recent(llm)[before:]
    assert [r["method"] for r in records] == [m for m in METHODS for _ in range(2)]
    for record in records:
        _check_record(record, record["method"], budget)


def test_mixed_methods_batched_together(llm, text_len):
    """Items of different requests (one per method) reach the model in one batch."""
    from vllm import SamplingParams

    budgets = [3, 7, 64, 100, 575, 2, 333]
    requests = [
        _request([300 + i], method=m, budget=k)
        for i, (m, k) in enumerate(zip(METHODS, budgets, strict=True))
    ]
    prompts = [make_prompt(r) for r in requests]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert [len(o.prompt_token_ids) - text_len[1] for o in outs] == budgets
    assert all(len(o.outputs[0].token_ids) > 0 for o in outs)


@pytest.mark.parametrize("relevance", ["llm", "clip"])
def test_reference_code_per_request(llm, text_len, relevance):
    """`reference: "code"` per request: exactly K rows for every method; where the paper
    and the released code differ (README, Fidelity) the selection differs on the same
    image and question, elsewhere it is the same."""
    methods = METHODS if relevance == "llm" else ["script", "qcsp", "trim"]
    base = 500 if relevance == "llm" else 550  # fresh images: no encoder-cache reuse
    requests = [
        _request([base + i], method=m, budget=64, relevance=relevance, reference=ref)
        for i, m in enumerate(methods)
        for ref in ("paper", "code")
    ]
    before = len(_recent(llm))
    results = _ok(run_requests(llm, requests))
    assert [r["prompt_len"] - text_len[1] for r in results] == [64] * len(requests)
    records = _recent(llm)[before:]
    assert [(r["method"], r["reference"]) for r in records] == [
        (m, ref) for m in methods for ref in ("paper", "code")
    ]
    for paper, code in zip(records[::2], records[1::2], strict=True):
        assert len(set(code["keep"])) == len(code["keep"]) == len(paper["keep"])
        if paper["method"] in ("gsp", "divprune", "uniform"):
            assert code["keep"] == paper["keep"], paper["method"]
        else:
            assert set(code["keep"]) != set(paper["keep"]), paper["method"]
        if paper["method"] == "prumerge+":  # the code passes outliers first, by attention
            assert code["keep"] != sorted(code["keep"])
        else:
            assert code["keep"] == sorted(code["keep"])


def test_server_default_is_script_64(llm, text_len):
    before = len(_recent(llm))
    (result,) = _ok(run_requests(llm, [{"question": QUESTION, "images": [400]}]))
    assert result["prompt_len"] - text_len[1] == 64
    _check_record(_recent(llm)[before], "script", 64)


def test_uniform_uses_the_24x24_grid(llm):
    from vllm_script.methods import uniform_indices

    before = len(_recent(llm))
    _ok(run_requests(llm, [_request([410], method="uniform", budget=144)]))
    (record,) = _recent(llm)[before:]
    assert record["keep"] == uniform_indices(N, 144, (24, 24))
    assert record["keep"][:3] == [25, 27, 29]  # every other row and column


@pytest.mark.parametrize("method", ["qcsp", "script", "trim"])
def test_clip_relevance_serves_and_changes_the_selection(llm, text_len, method):
    seeds = {"qcsp": 500, "script": 510, "trim": 520}
    image = seeds[method]
    requests = [
        _request([image], method=method, budget=64, relevance="llm"),
        _request([image], method=method, budget=64, relevance="clip"),
        _request([image], method=method, budget=64, relevance="clip", negate_relevance=True),
        _request([image + 1, image + 2], method=method, budget=2, relevance="clip"),
    ]
    before = len(_recent(llm))
    results = _ok(run_requests(llm, requests))
    images = [len(q["images"]) for q in requests]
    kept = [r["prompt_len"] - text_len[i] for r, i in zip(results, images, strict=True)]
    assert kept == [64, 64, 64, 4]
    llm_rec, clip_rec, neg_rec, *two = _recent(llm)[before:]
    assert len(two) == 2
    _check_record(llm_rec, method, 64, "llm")
    for record, k in [(clip_rec, 64), (neg_rec, 64), (two[0], 2), (two[1], 2)]:
        _check_record(record, method, k, "clip")
        # the CLIP tokenizer got the question's text, decoded from the LLM's ids
        assert "color" in record["query_text"] and "car" in record["query_text"], record
    assert llm_rec["query_text"] == ""  # no decode without clip relevance
    assert clip_rec["keep"] != llm_rec["keep"], "clip relevance chose the llm selection"
    assert neg_rec["keep"] != clip_rec["keep"], "negate_relevance changed nothing"


def test_clip_relevance_is_part_of_the_cache_key(llm):
    """Same image and question, llm then clip relevance: two selections, not one reused."""
    before = len(_recent(llm))
    requests = [
        _request([600], method="qcsp", budget=200, relevance="llm"),
        _request([600], method="qcsp", budget=200, relevance="clip"),
    ]
    _ok(run_requests(llm, requests))
    records = _recent(llm)[before:]
    assert [r["relevance"] for r in records] == ["llm", "clip"]


def test_missing_clip_checkpoint_refuses_to_start(tiny_llava, tmp_path):
    missing = tmp_path / "no-such-clip"
    with pytest.raises(RuntimeError) as err:
        run_in_fresh_engine(
            tiny_llava,
            [{"question": "hi", "images": []}],
            engine_kwargs={"hf_overrides": {"script": {"clip_path": str(missing)}}},
            timeout=300,
        )
    message = str(err.value)
    assert "refuses to start" in message and str(missing) in message, message[-2000:]
    assert "does not exist" in message, message[-2000:]


def test_clip_width_mismatch_refuses_to_start(tiny_llava, tmp_path):
    from vllm_script.clip_text import write_tiny_clip_checkpoint

    width = vision_width(tiny_llava)
    wrong = write_tiny_clip_checkpoint(tmp_path / "clip-wrong-width", width // 2)
    with pytest.raises(RuntimeError) as err:
        run_in_fresh_engine(
            tiny_llava,
            [{"question": "hi", "images": []}],
            engine_kwargs={
                "hf_overrides": {"script": {"relevance": "clip", "clip_path": str(wrong)}}
            },
            timeout=300,
        )
    message = str(err.value)
    assert "refuses to start" in message and str(wrong) in message, message[-2000:]
    pattern = rf"vision hidden size {width // 2}\b.*vision tower has width {width}\b"
    assert re.search(pattern, message), message[-2000:]
