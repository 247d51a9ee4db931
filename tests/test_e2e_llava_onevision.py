"""LLaVA-OneVision through the generic 1-D adapter, end to end on the CPU backend (tiny
checkpoint).

An image is a base crop, any-resolution tiles (unpadded) and one newline token per row,
all `<image>` tokens in one run; N depends on the image's size.
"""

from __future__ import annotations

import generic_e2e as g
import pytest

pytestmark = pytest.mark.e2e

CASE = g.Case(
    template="llava_onevision",
    embed_token="<image>",
    sizes=[[1, 224, 224], [2, 448, 224], [3, 300, 500]],
    short_name="LlavaOnevision",
)


@pytest.fixture(scope="module")
def res(tiny_llava_onevision):
    return g.run_case(CASE, tiny_llava_onevision)


def test_unpruned_requests_equal_vanilla(res):
    g.check_unpruned_equal_vanilla(res)


def test_sizes_give_different_n(res):
    tok = res["embed_id"]
    ns = [g.runs_of(r["prompt"], tok)[0] for r in res["vanilla"][: len(CASE.sizes)]]
    assert len(set(ns)) == len(ns) and min(ns) > g.OVERRIDE["budget"], ns


def test_each_image_keeps_min_budget_n_and_its_text(res):
    g.check_each_image_keeps_min_budget_n(res, CASE)


def test_two_images_in_one_prompt(res):
    g.check_two_images(res)


def test_worker_selected_k_of_n_per_image(res):
    g.check_recorded_selections(res, CASE)


def test_vision_space_method_refused_per_request(res):
    g.check_refused_request(res, CASE)
