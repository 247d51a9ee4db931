"""GSP, QCSP and Script selection, and the llm relevance."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_script.methods.base import apply_selection
from vllm_script.methods.gsp import gsp_candidates, gsp_scores, gsp_select
from vllm_script.methods.qcsp import dpp_quality, qcsp_select
from vllm_script.methods.script import script_select
from vllm_script.relevance import llm_relevance


def distinct_with_duplicates(n: int, d: int, dup_src: list[int], seed: int = 0) -> torch.Tensor:
    """[1, n, d]: random (near-orthogonal) tokens; each src token in `dup_src` (even index)
    is an exact copy of the dst token right after it."""
    features = torch.randn(1, n, d, generator=torch.Generator().manual_seed(seed))
    for i in dup_src:
        assert i % 2 == 0
        features[0, i] = features[0, i + 1]
    return features


def test_gsp_removes_exact_duplicates_before_distinct_tokens():
    dup = [4, 10, 22]
    features = distinct_with_duplicates(32, 256, dup)
    selection = gsp_select(features, 32 - len(dup))
    assert set(range(32)) - set(selection.keep[0].tolist()) == set(dup)


def test_gsp_scores_rank_duplicates_first():
    dup = [0, 8]
    scores, degree = gsp_scores(distinct_with_duplicates(20, 256, dup), tau=0.2, gamma=1.0)
    top = scores[0].argsort(descending=True)[:2]
    assert sorted((2 * top).tolist()) == dup
    assert degree[0, 0] >= 1 and degree[0, 4] >= 1  # tokens 0 and 8: src positions 0, 4
    assert degree[0, 1] == 0  # token 2 resembles no dst token


# -- GSP by hand: expected survivors written out, not computed by the code under test --


def _isolated_and_duplicate() -> torch.Tensor:
    """[1, 4, 4]: src 0 = e0 (no edge: orthogonal to every dst), dst 1 = e1,
    src 2 = e2 and dst 3 = e2 (a duplicate pair)."""
    return torch.eye(4)[[0, 1, 2, 2]].unsqueeze(0)


def _chain() -> torch.Tensor:
    """[1, 5, 6]: x_i = (e_i + e_{i+1}) / sqrt 2, neighbours at cosine .5, others 0:
    src 0 - dst 1 - src 2 - dst 3 - src 4."""
    eye = torch.eye(6)
    return torch.stack([(eye[i] + eye[i + 1]) / 2**0.5 for i in range(5)]).unsqueeze(0)


def test_gsp_scores_by_hand():
    # src 2 (one edge, mu 1): 1 * e^(1 - .2) = 2.2255, blended (degree < 4) with its mean
    # cosine to all dst (0 + 1) / 2: .5 * 2.2255 + .25 = 1.3628; src 0: no edge -> 0
    scores, degree = gsp_scores(_isolated_and_duplicate(), tau=0.2, gamma=1.0)
    assert degree.tolist() == [[0, 1]]
    torch.testing.assert_close(scores, torch.tensor([[0.0, 0.5 * math.exp(0.8) + 0.25]]))
    # chain: src 0 and 4 one edge (mu .5), src 2 two: d e^(.5 - .2), blended with
    # (.5 + 0) / 2 = .25 and (.5 + .5) / 2 = .5
    scores, degree = gsp_scores(_chain(), tau=0.2, gamma=1.0)
    assert degree.tolist() == [[1, 2, 1]]
    end, middle = 0.5 * math.exp(0.3) + 0.125, math.exp(0.3) + 0.25
    torch.testing.assert_close(scores, torch.tensor([[end, middle, end]]))


def test_gsp_never_removes_an_isolated_token():
    # k = 1, ratio 1: up to 2 src tokens may go, but src 0 has no edge >= tau: only the
    # duplicate src 2 is removed
    survivors = gsp_candidates(_isolated_and_duplicate(), 1, tau=0.2, gamma=1.0, ratio=1.0)
    assert survivors.tolist() == [[True, True, False, True]]
    # the chain with tau above every cosine (.5): no edge anywhere, nothing removed
    survivors = gsp_candidates(_chain(), 1, tau=0.6, gamma=1.0, ratio=1.0)
    assert survivors.tolist() == [[True] * 5]


def test_gsp_removes_the_middle_of_a_chain_first():
    # src 2 has two edges, the ends one each: one removal takes token 2
    survivors = gsp_candidates(_chain(), 4, tau=0.2, gamma=1.0, ratio=1.0)
    assert survivors.tolist() == [[True, True, False, True, True]]
    assert gsp_select(_chain(), 4).keep.tolist() == [[0, 1, 3, 4]]
    # the duplicate pair: GSP alone drops the src copy
    assert gsp_select(_isolated_and_duplicate(), 3).keep.tolist() == [[0, 1, 3]]


@pytest.mark.parametrize(
    ("n", "k"), [(2, 1), (7, 1), (7, 3), (63, 7), (577, 64), (576, 575)], ids=lambda v: str(v)
)
def test_gsp_select_keeps_exactly_k_in_order(n, k):
    features = torch.randn(2, n, 16)
    keep = gsp_select(features, k).keep
    assert keep.shape == (2, k)
    for row in keep:
        assert row.tolist() == sorted(set(row.tolist()))


def test_gsp_rounds_that_remove_every_src_token_keep_the_dst_tokens():
    # 576 -> 64: rounds 1-3 remove all src tokens (288 of 512 to go, 144 of 224, 72 of
    # 80), whatever the features, leaving tokens 7, 15, ..., 575; round 4 removes 8 of
    # those 72. Duplicating the round-4 src tokens 8 * 2i + 7 (i < 8) of the dst token
    # after them makes exactly those 8 the redundant ones (at D = 1024 random tokens
    # have cosines near 0, below tau).
    features = torch.randn(1, 576, 1024, generator=torch.Generator().manual_seed(3))
    dup = [16 * i + 7 for i in range(8)]
    for i in dup:
        features[0, i] = features[0, i + 8]
    keep = gsp_select(features, 64).keep[0].tolist()
    assert keep == [t for t in range(7, 576, 8) if t not in dup]


@pytest.mark.parametrize(
    ("n", "k"), [(1, 1), (7, 1), (7, 7), (63, 7), (577, 64)], ids=lambda v: str(v)
)
def test_script_keeps_exactly_k_gsp_survivors(n, k):
    gen = torch.Generator().manual_seed(n)
    base = torch.randn(1, max(1, n // 4), 32, generator=gen)
    # redundant tokens: noisy copies of a few prototypes
    features = base[:, torch.arange(n) % base.shape[1]] + 0.05 * torch.randn(
        1, n, 32, generator=gen
    )
    features = features.repeat(2, 1, 1)
    relevance = torch.rand(2, n, generator=gen)
    selection = script_select(features, relevance, k)
    survivors = gsp_candidates(features, k, tau=0.2, gamma=1.0, ratio=0.5)
    assert selection.keep.shape == (2, k)
    for b in range(2):
        assert survivors[b, selection.keep[b]].all()
        assert selection.keep[b].unique().numel() == k
    assert (selection.info["gsp_removed"] <= n - k).all()
    if n >= 63:
        assert (selection.info["gsp_removed"] > 0).all(), "redundant input: GSP should act"


def test_script_gsp_never_removes_more_than_n_minus_k():
    features = torch.ones(1, 10, 8) + 1e-3 * torch.randn(1, 10, 8)  # everything redundant
    survivors = gsp_candidates(features, 8, tau=0.2, gamma=1.0, ratio=1.0)
    assert survivors.sum() == 8


def test_qcsp_prefers_relevant_tokens_when_theta_high():
    features = torch.randn(1, 40, 64)
    relevance = torch.zeros(1, 40)
    relevance[0, 30:35] = 1.0
    picks = qcsp_select(features, relevance, 5, theta=0.95).keep
    assert picks[0].tolist() == [30, 31, 32, 33, 34]


def test_dpp_quality_forms():
    r = torch.tensor([[0.0, 1.0]])
    # theta 0.5: alpha 0.5, q = exp(0.5 r) / exp(0.5 max r)
    assert torch.allclose(dpp_quality(r, 0.5), torch.tensor([[torch.e**-0.5, 1.0]]))
    assert torch.equal(dpp_quality(r, 0.0), torch.ones(1, 2))
    assert dpp_quality(None, 0.5) is None


@pytest.mark.parametrize("theta", [0.0, 0.99, 0.9944, 0.999, 1 - 1e-12, 0.9999999999999999])
def test_dpp_quality_never_overflows_up_to_the_edge_of_theta(theta):
    """Any allowed theta (config: [0, 1)) gives finite quality in (0, 1] where r is max, and
    qcsp selects k distinct tokens from it without raising."""
    g = torch.Generator().manual_seed(0)
    r = torch.rand(2, 50, generator=g)
    r[:, 7] = 1.0
    q = dpp_quality(r, theta)
    assert torch.isfinite(q).all() and (q >= 0).all() and (q <= 1).all()
    assert torch.equal(q[:, 7], torch.ones(2))
    keep = qcsp_select(torch.randn(2, 50, 16, generator=g), r, 12, theta=theta).keep
    assert all(len(set(row)) == 12 for row in keep.tolist())


def test_llm_relevance_is_mean_cosine_min_max_normalised():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    query = [torch.tensor([[2.0, 0.0]])]
    rel = llm_relevance(tokens, query)
    assert torch.allclose(rel, torch.tensor([[1.0, 0.0, 2**-0.5]]), atol=1e-6)
    assert torch.equal(llm_relevance(tokens, [torch.empty(0, 2)]), torch.zeros(1, 3))


def test_apply_selection_gathers_in_order_and_appends_extra():
    from vllm_script.methods.base import Selection

    tokens = torch.arange(12.0).view(1, 6, 2)
    sel = Selection(keep=torch.tensor([[1, 4]]), extra=torch.full((1, 1, 2), -1.0))
    out = apply_selection(tokens, sel)
    assert out.tolist() == [[[2.0, 3.0], [8.0, 9.0], [-1.0, -1.0]]]
    assert sel.num_tokens == 3


@pytest.mark.parametrize("tile", [16, 2048], ids=["tiles-16", "one-tile"])
def test_cpu_bipartite_stats_by_hand_across_tiles(monkeypatch, tile):
    """GSP's statistics on CPU, dst split into tiles of 16 (three, the last partial) or
    one: src 0 equals dst 3 and dst 20 (different tiles), src 1 equals dst 5 and dst 9
    (one tile); every other token lies in dims 2.. (cosine 0 to src 0 and 1). Ties go to
    the lowest dst index; the rest of the rows keep the fp64 contract."""
    from vllm_script.reference import bipartite as rbip
    from vllm_script.reference import contract

    monkeypatch.setattr(rbip, "CPU_DST_TILE", tile)
    g = torch.Generator().manual_seed(5)
    f = torch.zeros(1, 80, 8)
    f[0, :, 2:] = torch.randn(80, 6, generator=g)
    eye = torch.eye(8)
    for token, axis in ((0, 0), (2 * 3 + 1, 0), (2 * 20 + 1, 0), (2, 1), (2 * 5 + 1, 1), (19, 1)):
        f[0, token] = 3.0 * eye[axis]  # norm 3: the cosine still 1
    stats = rbip.bipartite_stats(f, 0.2)
    assert stats.best_dst[0, :2].tolist() == [3, 5]
    assert stats.degree[0, :2].tolist() == [2, 2]
    torch.testing.assert_close(stats.best_sim[0, :2], torch.ones(2))
    torch.testing.assert_close(stats.edge_sum[0, :2], torch.full((2,), 2.0))
    torch.testing.assert_close(stats.total_sum[0, :2], torch.full((2,), 2.0))
    assert contract.bipartite_violations(f, 0.2, stats) == []


@pytest.mark.parametrize("tile", [16, 2048], ids=["too-wide-to-share", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_relevance", [True, False], ids=["relevance", "no-relevance"])
@pytest.mark.parametrize(("n", "k"), [(2, 1), (101, 17), (150, 150)], ids=lambda v: str(v))
def test_script_cpu_shared_gram_equals_separate_steps(
    monkeypatch, tile, dtype, with_relevance, n, k
):
    """On the compiled CPU path Script hands GSP's GEMM dots to the DPP: the same picks, in
    the same order, as GSP then QCSP called separately (random features: no gains within
    fp32 rounding of a tie). Above the tile width the DPP gets no dots."""
    pytest.importorskip("numba")
    from vllm_script.reference import bipartite as rbip
    from vllm_script.reference import dpp_cpu

    monkeypatch.setattr(rbip, "CPU_DST_TILE", tile)
    given = []
    greedy_one = dpp_cpu.greedy_one

    def spy(features, quality, eligible, k, cross_dots=None):
        given.append(cross_dots)
        return greedy_one(features, quality, eligible, k, cross_dots)

    monkeypatch.setattr(dpp_cpu, "greedy_one", spy)
    g = torch.Generator().manual_seed(n + k)
    base = torch.randn(2, n // 3 + 1, 40, generator=g)  # redundant: GSP removes tokens
    features = base.repeat_interleave(3, 1)[:, :n] + 0.3 * torch.randn(2, n, 40, generator=g)
    features = features.to(dtype)
    relevance = torch.rand(2, n, generator=g) if with_relevance else None
    shared = script_select(features, relevance, k)
    assert len(given) == 2 and all((d is not None) == (n // 2 <= tile) for d in given)
    survivors = gsp_candidates(features, k, tau=0.2, gamma=1.0, ratio=0.5)
    separate = qcsp_select(features, relevance, k, candidates=survivors)
    assert torch.equal(shared.info["order"], separate.info["order"])
    assert torch.equal(shared.keep, separate.keep)
    assert torch.equal(shared.info["gsp_removed"], (~survivors).sum(dim=1))
    given.clear()
    unshared = script_select(features, relevance, k, shared_gram=False)
    assert len(given) == 2 and all(d is None for d in given)
    assert torch.equal(unshared.info["order"], separate.info["order"])
    if n > 100 and k < n:
        assert (shared.info["gsp_removed"] > 0).all(), "redundant input: GSP should act"


@pytest.mark.parametrize("n", [1, 2, 7, 64], ids=lambda v: f"N{v}")
def test_cpu_stats_and_dots_hands_back_the_gemm(n):
    """The statistics are `bipartite_stats`' own; the dots are src . dst (fp64 oracle)."""
    pytest.importorskip("numba")
    from vllm_script.reference import bipartite as rbip

    f = torch.randn(2, n, 24, generator=torch.Generator().manual_seed(n)).bfloat16()
    stats, dots = rbip.cpu_stats_and_dots(f, 0.2)
    for got, want in zip(stats, rbip.bipartite_stats(f, 0.2), strict=True):
        assert torch.equal(got, want)
    exact = f.double()[:, 0::2] @ f.double()[:, 1::2].transpose(1, 2)
    assert dots.dtype == torch.float32 and dots.shape == ((2, (n + 1) // 2, n // 2))
    torch.testing.assert_close(dots.double(), exact, rtol=1e-5, atol=1e-4)
    assert rbip.cpu_stats_and_dots(f, 0.2, keep_dots=False)[1] is None


@pytest.mark.parametrize(
    ("k", "relevance_shape", "error"),
    [
        (0, (2, 9), r"k=0 must be in \[1, 9\]"),
        (10, (2, 9), r"k=10 must be in \[1, 9\]"),
        (3, (2, 8), r"relevance must have shape \[B, N\] = \[2, 9\], got \[2, 8\]"),
        (3, (1, 9), r"relevance must have shape \[B, N\] = \[2, 9\], got \[1, 9\]"),
    ],
    ids=["k0", "k-over-N", "relevance-short", "relevance-one-image"],
)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_script_refuses_bad_inputs_before_the_compiled_loop(k, relevance_shape, error, shared):
    """The shared path calls the compiled DPP directly, which indexes without bounds checks:
    it refuses what the separate calls refuse, with the same message."""
    features = torch.randn(2, 9, 8)
    with pytest.raises(ValueError, match=error):
        script_select(features, torch.rand(relevance_shape), k, shared_gram=shared)
