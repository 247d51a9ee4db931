"""InternVL (transformers format, InternVL 3) through the generic 1-D adapter, end to end
on the CPU backend (tiny checkpoint).

An image is 1 to 4 tiles (+ a thumbnail when there are several), 64 tokens per tile
here (256 in the released models), all in one run between `<img>` and `</img>`: the
budget is per image, over all its tiles.
"""

from __future__ import annotations

import generic_e2e as g
import pytest

pytestmark = pytest.mark.e2e

CASE = g.Case(
    template="internvl",
    embed_token="<IMG_CONTEXT>",
    sizes=[[1, 224, 224], [2, 448, 224], [3, 448, 448]],
    short_name="InternVL",
)


@pytest.fixture(scope="module")
def res(tiny_internvl):
    return g.run_case(CASE, tiny_internvl)


def test_unpruned_requests_equal_vanilla(res):
    g.check_unpruned_equal_vanilla(res)


def test_tiles_give_different_n(res):
    tok = res["embed_id"]
    ns = [g.runs_of(r["prompt"], tok)[0] for r in res["vanilla"][: len(CASE.sizes)]]
    assert ns == [64, 3 * 64, 5 * 64], ns  # 1 tile; 2 tiles + thumbnail; 4 tiles + thumbnail


def test_each_image_keeps_min_budget_n_and_its_text(res):
    g.check_each_image_keeps_min_budget_n(res, CASE)


def test_two_images_in_one_prompt(res):
    g.check_two_images(res)


def test_worker_selected_k_of_n_per_image(res):
    g.check_recorded_selections(res, CASE)


def test_vision_space_method_refused_per_request(res):
    g.check_refused_request(res, CASE)
