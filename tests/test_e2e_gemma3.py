"""Gemma 3 through the generic 1-D adapter, end to end on the CPU backend (tiny checkpoint).

Every image is resized to the tower's size, so N is the same for all (64 here, 256 in
the released models); the image's tokens sit between `\\n\\n<start_of_image>` and
`<end_of_image>\\n\\n`, and the LLM attends bidirectionally within an image.
"""

from __future__ import annotations

import generic_e2e as g
import pytest

pytestmark = pytest.mark.e2e

CASE = g.Case(
    template="gemma3",
    embed_token="<image_soft_token>",
    sizes=[[1, 224, 224], [2, 320, 200], [3, 160, 300]],
    short_name="Gemma3",
)


@pytest.fixture(scope="module")
def res(tiny_gemma3):
    return g.run_case(CASE, tiny_gemma3)


def test_unpruned_requests_equal_vanilla(res):
    g.check_unpruned_equal_vanilla(res)


def test_each_image_keeps_min_budget_n_and_its_text(res):
    g.check_each_image_keeps_min_budget_n(res, CASE)


def test_two_images_in_one_prompt(res):
    g.check_two_images(res)


def test_worker_selected_k_of_n_per_image(res):
    g.check_recorded_selections(res, CASE)


def test_vision_space_method_refused_per_request(res):
    g.check_refused_request(res, CASE)
