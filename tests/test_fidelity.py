"""`reference="code"`: each method selects what its authors' released code selects.

Every expected value here is computed by hand in the comments (small N), from a reading of
the released code (README, "Fidelity"), not from the code under test. The side-by-side
figures against the authors' code itself come from benchmarks/fidelity_vs_authors.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_script.methods import (
    apply_selection,
    divprune_select,
    prumerge_plus_select,
    qcsp_select,
    script_select,
    trim_select,
)
from vllm_script.methods.prumerge import code_stride
from vllm_script.methods.qcsp import dpp_quality
from vllm_script.methods.trim import code_count, code_iqr_outliers
from vllm_script.models.mrope import kept_offsets

# ---------------------------------------------------------------- QCSP: q = r


def _three_tokens():
    """x0 = (1, 0), x1 = (.8, .6) (cos .8 to x0), x2 = (0, 1); relevance 1, .9, .5."""
    feats = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]])
    return feats, torch.tensor([[1.0, 0.9, 0.5]])


def test_code_quality_is_the_relevance_itself():
    r = torch.tensor([[0.0, 0.25, 1.0]])
    assert torch.equal(dpp_quality(r, 0.5, "code"), r)
    assert torch.equal(dpp_quality(r, 0.9, "code"), r)  # theta plays no part
    assert dpp_quality(None, 0.5, "code") is None


def test_qcsp_code_and_paper_pick_by_hand():
    # first pick: largest q^2, token 0 under both forms. Second: gain q_i^2 (1 - cos^2):
    #   code  q = r:            x1 .81 * .36 = .2916  >  x2 .25 * 1 = .25      -> {0, 1}
    #   paper q = e^{.5(r-1)}:  x1 e^-.1 * .36 = .326  <  x2 e^-.5 = .607       -> {0, 2}
    feats, r = _three_tokens()
    code = qcsp_select(feats, r, 2, reference="code")
    assert code.keep.tolist() == [[0, 1]] and code.info["order"].tolist() == [[0, 1]]
    assert qcsp_select(feats, r, 2).keep.tolist() == [[0, 2]]


# ---------------------------------------------------------------- Script: its released DPP


def _span_example():
    """x0 = e1, x1 = e2, x2 = .6 e1 + .8 e2 (in the span of x0, x1), x3 = .6 e1 + .8 e3."""
    feats = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.6, 0.0, 0.8]]])
    return feats, torch.tensor([[0.9, 0.8, 1.0, 0.5]])


def test_script_code_is_the_released_approximate_dpp():
    # L_ii = q_i^2 = .81 .64 1 .25 -> pick 2. L_i2 = .54 .64 - .18; gains after it:
    #   .81 - .2916 = .5184, .64 - .4096 = .2304, .25 - .0324 = .2176 -> pick 0.
    # exact greedy (CDPruner): x1 lies in span(x0, x2): gain 0; x3: e = (.27 - .18 * .54)
    #   / .72 = .24, gain .2176 - .0576 = .16 -> pick 3: {0, 2, 3}.
    # Script's released code drops the cross term: gain_i -= L_i0^2 / .5184:
    #   x1: .2304 - 0 = .2304, x3: .2176 - .0729 / .5184 = .0770 -> pick 1: {0, 1, 2}.
    feats, r = _span_example()
    script = script_select(feats, r, 3, reference="code")
    assert script.keep.tolist() == [[0, 1, 2]]
    assert script.info["order"].tolist() == [[2, 0, 1]]
    qcsp = qcsp_select(feats, r, 3, reference="code")
    assert qcsp.keep.tolist() == [[0, 2, 3]] and qcsp.info["order"].tolist() == [[2, 0, 3]]


def test_script_code_ignores_gsp():
    # four exact duplicates of one token and four distinct ones: GSP (paper) may only
    # remove duplicates; the released code's final set is its DPP's set, GSP or not
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 8, 16, generator=g)
    feats[0, [0, 2, 4, 6]] = feats[0, 1].clone()
    r = torch.rand(1, 8, generator=g)
    a = script_select(feats, r, 4, reference="code", gsp_ratio=1.0, tau=-1.0)
    b = script_select(feats, r, 4, reference="code", gsp_ratio=0.0)
    assert torch.equal(a.keep, b.keep)


def test_script_code_past_the_rank_takes_the_frozen_gains_without_nan():
    # four copies of one direction, q = .9 .8 .7 .6: L_ij = q_i q_j. Pick 0; the code's
    # step leaves gains q_i^2 (1 - .81 / (.9 + 1e-6)^2) ~ 2.2e-6 q_i^2 > 0 -> pick 1; its
    # step divides by (sqrt(.64 * 2.2e-6) + 1e-6)^2 and drives every gain far below 0;
    # the code then stops updating and takes the least negative frozen gain: token 3
    # (q .6) before token 2. The exact DPP has no gain left after token 0 and fills by
    # relevance: 1, 2. Neither repeats an index or gives NaN.
    feats = torch.tensor([[[1.0, 0.0]] * 4]) * torch.tensor([[[1.0], [2.0], [0.5], [3.0]]])
    r = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    script = script_select(feats, r, 3, reference="code")
    assert script.info["order"].tolist() == [[0, 1, 3]]
    assert qcsp_select(feats, r, 3, reference="code").info["order"].tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("k", [1, 2, 63, 64])
@pytest.mark.parametrize("method", ["script", "qcsp"])
def test_code_exact_count_distinct_and_ascending(method, k):
    g = torch.Generator().manual_seed(k)
    feats = torch.randn(2, 64, 4, generator=g)  # rank 4 < k: past the rank as well
    r = torch.rand(2, 64, generator=g)
    select = script_select if method == "script" else qcsp_select
    keep = select(feats, r, k, reference="code").keep
    assert keep.shape == (2, k)
    for row in keep.tolist():
        assert row == sorted(set(row))


# ---------------------------------------------------------------- TRIM


def _trim_example():
    """8 patches; text t = (1, 0); embeddings give dot(patch, t) = 0 except patch 2 (-1)
    and patch 5 (-3): the same cosine (-1), different norms. Features (i, 10 i)."""
    img = torch.tensor([[0.0, 1.0]]).repeat(8, 1)
    img[2] = torch.tensor([-1.0, 0.0])
    img[5] = torch.tensor([-3.0, 0.0])
    feats = torch.stack([torch.tensor([float(i), 10.0 * i]) for i in range(8)])
    return feats[None], img[None], torch.tensor([[1.0, 0.0]])


def test_trim_code_scores_negated_raw_dot_products():
    # softmax(-dot) = softmax(0, 0, 1, 0, 0, 3, 0, 0): Z = 6 + e + e^3
    feats, img, text = _trim_example()
    z = 6 + math.e + math.e**3
    a, b, c = 1 / z, math.e / z, math.e**3 / z
    sel = trim_select(feats, img, text, 3, reference="code")
    torch.testing.assert_close(sel.info["scores"][0], torch.tensor([a, a, b, a, a, c, a, a]))


def test_trim_code_keeps_the_codes_set_and_count():
    # sorted a x6, b, c: Q1 = a, Q3 = a + .25 (b - a) (position 5.25), threshold
    # a + .625 (b - a) < b: outliers {2, 5}; the code keeps int(8 * (2 / 8)) = 2 + 1 token
    feats, img, text = _trim_example()
    sel = trim_select(feats, img, text, 3, reference="code")
    assert sel.info["iqr_count"].tolist() == [2] and sel.info["code_tokens"].tolist() == [3]
    assert sel.keep.tolist() == [[2, 5]]
    # aggregate: mean of 0, 1, 3, 4, 6, 7 = 3.5
    torch.testing.assert_close(sel.extra, torch.tensor([[[3.5, 35.0]]]))
    # budget 2: the single best is 5 (dot -3); the cosine (paper, negated) ties 2 and 5
    assert trim_select(feats, img, text, 2, reference="code").keep.tolist() == [[5]]
    assert trim_select(feats, img, text, 2, negate=True).keep.tolist() == [[2]]
    # the paper does not negate: 2 and 5 score lowest, no outlier, lowest indices kept
    paper = trim_select(feats, img, text, 3)
    assert paper.keep.tolist() == [[0, 1]] and paper.info["iqr_count"].tolist() == [0]


def test_trim_code_truncates_the_question_to_its_first_segment():
    feats, img, text = _trim_example()
    segments = torch.stack([text, torch.tensor([[0.0, 5.0]])], dim=1)  # [1, 2, 2]
    a = trim_select(feats, img, segments, 3, reference="code")
    b = trim_select(feats, img, text, 3, reference="code")
    assert torch.equal(a.keep, b.keep)
    torch.testing.assert_close(a.info["scores"], b.info["scores"])


def test_code_count_is_computed_like_the_code():
    # int(N * (c / N)) in float64: 2880 * (13 / 2880) = 12.999999999999998 -> 12
    mask = torch.zeros(1, 2880, dtype=torch.bool)
    mask[0, :13] = True
    assert code_count(mask).tolist() == [12]
    mask = torch.zeros(2, 576, dtype=torch.bool)
    mask[0, :36] = True
    assert code_count(mask).tolist() == [36, 0]


def test_code_iqr_rule_by_hand():
    scores = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 100], [1.0, 1, 1, 1, 1, 1, 1, 1]])
    # row 0: Q1 = 2.75, Q3 = 6.25, IQR = 3.5, threshold 11.5 -> only 100
    assert code_iqr_outliers(scores).tolist() == [[False] * 7 + [True], [False] * 8]


# ---------------------------------------------------------------- PruMerge+


def _prumerge_example():
    """16 tokens (4 x 4). Attention .05 everywhere but token 4 (.1) and token 9 (.2).
    Keys on a circle at angles .01 i^2: each token's nearest key is token i - 1 (0's is 1).
    Features (i, 1)."""
    attn = torch.full((1, 16), 0.05)
    attn[0, 4], attn[0, 9] = 0.1, 0.2
    angle = 0.01 * torch.arange(16.0) ** 2
    keys = torch.stack([angle.cos(), angle.sin()], dim=-1)[None]
    feats = torch.stack([torch.arange(16.0), torch.ones(16)], dim=-1)[None]
    return feats, keys, attn


def test_prumerge_code_keeps_outliers_then_every_sth_token_in_the_codes_order():
    # sorted .05 x14, .1, .2: Q1 = Q3 = .05, IQR 0 -> outliers 9, 4 (by attention).
    # stride int(int(1 / (2 / 16)) / 3) = int(8 / 3) = 2: 0, 2, ..., 14 (< 15) minus 4.
    feats, keys, attn = _prumerge_example()
    sel = prumerge_plus_select(feats, keys, attn, 10, (4, 4), reference="code", num_neighbors=1)
    assert sel.keep.tolist() == [[9, 4, 0, 2, 6, 8, 10, 12, 14]]
    assert sel.info["iqr_count"].tolist() == [2] and sel.info["code_tokens"].tolist() == [10]
    # code merge (num_neighbors 1): x_i + a_j x_j with j = i - 1 (0 -> 1); a_8 = .05 ...
    expected = [
        [9 + 0.05 * 8, 1.05], [4 + 0.05 * 3, 1.05], [0 + 0.05 * 1, 1.05],
        [2 + 0.05 * 1, 1.05], [6 + 0.05 * 5, 1.05], [8 + 0.05 * 7, 1.05],
        [10 + 0.2 * 9, 1.2], [12 + 0.05 * 11, 1.05], [14 + 0.05 * 13, 1.05],
    ]  # fmt: skip
    torch.testing.assert_close(sel.kept_values[0], torch.tensor(expected))
    # extra: sum of a_p x_p over the pruned 1 3 5 7 11 13 15: .05 * (55, 7)
    torch.testing.assert_close(sel.extra[0], torch.tensor([[2.75, 0.35]]))
    # the rows the LLM receives are in this order
    out = apply_selection(feats, sel)[0]
    torch.testing.assert_close(out[:2], torch.tensor([[9.4, 1.05], [4.15, 1.05]]))


def test_prumerge_code_default_merges_32_neighbours_unnormalised():
    # 32 neighbours > 15 others: every other token. S = sum_j a_j x_j = .05 (120, 16)
    # + .05 (4, 1) + .15 (9, 1) = (7.55, 1); merged_i = x_i + S - a_i x_i
    feats, keys, attn = _prumerge_example()
    sel = prumerge_plus_select(feats, keys, attn, 10, (4, 4), reference="code")
    torch.testing.assert_close(sel.kept_values[0, 0], torch.tensor([9 + 7.55 - 1.8, 1.8]))
    torch.testing.assert_close(sel.kept_values[0, 1], torch.tensor([4 + 7.55 - 0.4, 1.9]))


def test_prumerge_code_budget_cuts_or_tops_up_the_list():
    feats, keys, attn = _prumerge_example()
    short = prumerge_plus_select(feats, keys, attn, 5, (4, 4), reference="code")
    assert short.keep.tolist() == [[9, 4, 0, 2]]
    # longer: the list, then the rest by attention (all .05: lowest index first)
    long = prumerge_plus_select(feats, keys, attn, 12, (4, 4), reference="code")
    assert long.keep.tolist() == [[9, 4, 0, 2, 6, 8, 10, 12, 14, 1, 3]]
    # the paper's set at the same budget: spatial order, a 2-D sub-grid
    paper = prumerge_plus_select(feats, keys, attn, 10, (4, 4))
    assert paper.keep.tolist() == [sorted(paper.keep[0].tolist())]
    assert set(paper.keep[0].tolist()) != {9, 4, 0, 2, 6, 8, 10, 12, 14}


def test_prumerge_code_stride_stops_before_the_last_token():
    # one outlier (7): stride int(int(1 / (1 / 16)) / 3) = 5; the code's bound is 575 for
    # N = 576, i.e. N - 1: 0, 5, 10 (not 15)
    feats, keys, _ = _prumerge_example()
    attn = torch.full((1, 16), 0.05)
    attn[0, 7] = 0.3
    sel = prumerge_plus_select(feats, keys, attn, 5, (4, 4), reference="code")
    assert sel.keep.tolist() == [[7, 0, 5, 10]] and sel.info["code_tokens"].tolist() == [5]


def test_prumerge_code_where_the_code_fails_stays_safe():
    # equal attention: no outlier, the code divides by zero; here the stride is N
    # (only token 0), then the rest by attention (ties: lowest index)
    feats, keys, _ = _prumerge_example()
    flat = torch.full((1, 16), 1 / 16)
    sel = prumerge_plus_select(feats, keys, flat, 4, (4, 4), reference="code")
    assert sel.keep.tolist() == [[0, 1, 2]] and sel.info["code_tokens"].tolist() == [2]
    assert sel.info["iqr_count"].tolist() == [0]
    assert code_stride(0, 16) == 16 and code_stride(6, 16) == 1  # int(int(2.67) / 3) = 0


@pytest.mark.parametrize("k", [1, 2, 15, 16, 17])
def test_prumerge_code_exact_count_distinct(k):
    g = torch.Generator().manual_seed(k)
    feats, keys = torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, 4, generator=g)
    attn = torch.softmax(3 * torch.randn(2, 16, generator=g), dim=1)
    sel = prumerge_plus_select(feats, keys, attn, k, (4, 4), reference="code")
    assert sel.num_tokens == min(k, 16)
    for row in sel.keep.tolist():
        assert len(set(row)) == len(row)
    assert apply_selection(feats, sel).shape == (2, min(k, 16), 4)


# ---------------------------------------------------------------- DivPrune, the API


def test_divprune_code_is_the_same_selection():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 40, 8, generator=g)
    a, b = divprune_select(feats, 9), divprune_select(feats, 9, reference="code")
    assert torch.equal(a.keep, b.keep) and torch.equal(a.info["order"], b.info["order"])


@pytest.mark.parametrize(
    "call",
    [
        lambda ref: qcsp_select(torch.randn(1, 4, 2), None, 2, reference=ref),
        lambda ref: script_select(torch.randn(1, 4, 2), None, 2, reference=ref),
        lambda ref: divprune_select(torch.randn(1, 4, 2), 2, reference=ref),
        lambda ref: trim_select(
            torch.randn(1, 4, 2), torch.randn(1, 4, 3), torch.randn(1, 3), 2, reference=ref
        ),
        lambda ref: prumerge_plus_select(
            torch.randn(1, 4, 2),
            torch.randn(1, 4, 2),
            torch.full((1, 4), 0.25),
            2,
            None,
            reference=ref,
        ),
    ],
    ids=["qcsp", "script", "divprune", "trim", "prumerge+"],
)
def test_bad_reference_is_named(call):
    with pytest.raises(ValueError, match=r"reference='authors'.*\['paper', 'code'\]"):
        call("authors")


@pytest.mark.parametrize("k", [0, 5, 2.0], ids=["k=0", "k>N", "float"])
def test_script_code_bad_k_is_named(k):
    with pytest.raises(ValueError, match=r"k=.*must be an integer in \[1, 4\]"):
        script_select(torch.randn(1, 4, 3), None, k, reference="code")


def test_mrope_positions_follow_a_non_ascending_keep():
    # grid (t, h, w) = (1, 2, 3): token i sits at (0, i // 3, i % 3); row r gets keep[r]'s
    offsets = kept_offsets((1, 2, 3), 1.0, torch.tensor([5, 0, 3]))
    assert offsets.tolist() == [[0, 1, 2], [0, 0, 0], [0, 1, 0]]
