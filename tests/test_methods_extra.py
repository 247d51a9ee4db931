"""TRIM, PruMerge+, DivPrune and uniform selection: hand-checked cases + the exact-count rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vllm_script.methods.base import Selection, apply_selection
from vllm_script.methods.divprune import divprune_select
from vllm_script.methods.prumerge import cls_attention_from_qk, prumerge_plus_select
from vllm_script.methods.trim import iqr_outliers, trim_scores, trim_select
from vllm_script.methods.uniform import uniform_indices, uniform_select
from vllm_script.reference.divprune import divprune_order, nearest_neighbor_distance

# ---------------------------------------------------------------- exact-count guarantee

SIZES = [1, 4, 24, 577]
GRIDS = {1: (1, 1), 4: (2, 2), 24: (4, 6), 577: None}  # 577 is prime: 1-D layout
BUDGETS = ["1", "2", "7", "N-1", "N"]


def _budget(name: str, n: int) -> int:
    return {"N": n, "N-1": n - 1}[name] if name.startswith("N") else int(name)


CASES = [
    pytest.param(n, _budget(b, n), id=f"N{n}-k={b}")
    for n in SIZES
    for b in BUDGETS
    if _budget(b, n) >= 1
]


def _inputs(n: int, bsz: int = 2, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(bsz, n, dim, generator=g)
    keys = torch.randn(bsz, n, dim, generator=g)
    attn = torch.softmax(torch.randn(bsz, n, generator=g) * 3, dim=1)
    img = torch.randn(bsz, n, 6, generator=g)
    txt = torch.randn(bsz, 6, generator=g)
    return feats, keys, attn, img, txt


def _check_selection(sel: Selection, feats: torch.Tensor, k: int, ascending: bool = True) -> None:
    bsz, n, dim = feats.shape
    expected = min(k, n)
    assert sel.num_tokens == expected
    keep = sel.keep
    assert keep.dtype == torch.long and keep.shape[0] == bsz
    if ascending:
        assert torch.equal(keep, keep.sort(dim=1).values), "keep must be ascending"
    for row in keep:
        assert len(set(row.tolist())) == row.numel(), "keep must be distinct"
        assert all(0 <= i < n for i in row.tolist())
    if sel.kept_values is not None:
        assert sel.kept_values.shape == (bsz, keep.shape[1], dim)
    out = apply_selection(feats, sel)
    assert out.shape == (bsz, expected, dim)
    assert torch.isfinite(out).all()


METHODS = {
    "trim": lambda f, ks, a, im, tx, k, grid: trim_select(f, im, tx, k),
    "trim-negate": lambda f, ks, a, im, tx, k, grid: trim_select(f, im, tx, k, negate=True),
    "prumerge+": lambda f, ks, a, im, tx, k, grid: prumerge_plus_select(f, ks, a, k, grid),
    "prumerge+-pruned-code": lambda f, ks, a, im, tx, k, grid: prumerge_plus_select(
        f, ks, a, k, grid, normalize=False, merge_pool="pruned"
    ),
    "trim-code": lambda f, ks, a, im, tx, k, grid: trim_select(f, im, tx, k, reference="code"),
    "prumerge+-code": lambda f, ks, a, im, tx, k, grid: prumerge_plus_select(
        f, ks, a, k, grid, reference="code"
    ),
    "divprune": lambda f, ks, a, im, tx, k, grid: divprune_select(f, k),
    "divprune-code": lambda f, ks, a, im, tx, k, grid: divprune_select(f, k, reference="code"),
    "uniform-grid": lambda f, ks, a, im, tx, k, grid: uniform_select(
        f.shape[1], k, grid, batch=f.shape[0]
    ),
    "uniform-1d": lambda f, ks, a, im, tx, k, grid: uniform_select(f.shape[1], k, batch=f.shape[0]),
}


CODE_ORDER = {"prumerge+-code"}  # keep in the authors' order, not ascending


@pytest.mark.parametrize("method", list(METHODS), ids=lambda m: m)
@pytest.mark.parametrize("n, k", CASES)
def test_exact_count(method: str, n: int, k: int) -> None:
    feats, keys, attn, img, txt = _inputs(n)
    sel = METHODS[method](feats, keys, attn, img, txt, k, GRIDS[n])
    _check_selection(sel, feats, k, ascending=method not in CODE_ORDER)


@pytest.mark.parametrize("method", list(METHODS), ids=lambda m: m)
def test_exact_count_with_duplicate_tokens(method: str) -> None:
    """All tokens identical (every score and distance tied): still k distinct tokens."""
    n, k = 24, 7
    feats = torch.ones(2, n, 8)
    attn = torch.full((2, n), 1.0 / n)
    sel = METHODS[method](feats, feats, attn, torch.ones(2, n, 6), torch.ones(2, 6), k, (4, 6))
    _check_selection(sel, feats, k, ascending=method not in CODE_ORDER)


@pytest.mark.parametrize("k", [0, -1], ids=lambda k: f"k={k}")
@pytest.mark.parametrize("method", list(METHODS), ids=lambda m: m)
def test_bad_k_is_named(method: str, k: int) -> None:
    feats, keys, attn, img, txt = _inputs(4)
    with pytest.raises(ValueError, match=rf"k={k}.*>= 1"):
        METHODS[method](feats, keys, attn, img, txt, k, (2, 2))


# ---------------------------------------------------------------- TRIM


def _trim_example():
    """8 patches; cos(patch, text) = 1 for patches 2 and 5, 0 for the others."""
    text = torch.tensor([[1.0, 0.0]])
    img = torch.tensor([[0.0, 1.0]]).repeat(8, 1)
    img[[2, 5]] = torch.tensor([3.0, 0.0])  # cosine ignores the norm
    feats = torch.stack([torch.tensor([float(i), 10.0 * i]) for i in range(8)])
    return feats[None], img[None], text


def test_trim_scores_are_softmax_of_cosine() -> None:
    _, img, text = _trim_example()
    scores = trim_scores(img, text)
    a, b = 1 / (6 + 2 * math.e), math.e / (6 + 2 * math.e)
    expected = torch.tensor([a, a, b, a, a, b, a, a])
    torch.testing.assert_close(scores[0], expected)
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0))


def test_trim_iqr_count_by_hand() -> None:
    # scores sorted: a x6, b x2. Q1 = a, Q3 = a + 0.25 (b - a) (position 5.25 of 0..7)
    # -> threshold a + 0.625 (b - a) < b: the two b's are outliers.
    feats, img, text = _trim_example()
    assert trim_select(feats, img, text, 3).info["iqr_count"].tolist() == [2]
    # negated: two low scores, six high ones; Q3 = high, threshold above it -> none
    assert trim_select(feats, img, text, 3, negate=True).info["iqr_count"].tolist() == [0]


def test_iqr_outliers_rule() -> None:
    scores = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 100], [1.0, 1, 1, 1, 1, 1, 1, 1]])
    # row 0: Q1 = 2.75, Q3 = 6.25, IQR = 3.5, threshold 11.5 -> only 100
    assert iqr_outliers(scores).tolist() == [[False] * 7 + [True], [False] * 8]


def test_trim_keeps_best_and_aggregates_the_rest() -> None:
    feats, img, text = _trim_example()
    sel = trim_select(feats, img, text, 3)
    assert sel.keep.tolist() == [[2, 5]]
    assert sel.kept_values is None
    # unselected 0, 1, 3, 4, 6, 7: mean 21 / 6 = 3.5
    torch.testing.assert_close(sel.extra, torch.tensor([[[3.5, 35.0]]]))
    assert apply_selection(feats, sel).shape == (1, 3, 2)


def test_trim_negate_reverses_and_ties_go_to_lowest_index() -> None:
    feats, img, text = _trim_example()
    sel = trim_select(feats, img, text, 4, negate=True)
    assert sel.keep.tolist() == [[0, 1, 3]]  # six tied low-cosine patches: lowest indices
    torch.testing.assert_close(sel.extra, torch.tensor([[[(2 + 4 + 5 + 6 + 7) / 5, 48.0]]]))


def test_trim_k1_is_one_aggregate_of_everything() -> None:
    feats, img, text = _trim_example()
    sel = trim_select(feats, img, text, 1)
    assert sel.keep.shape == (1, 0)
    torch.testing.assert_close(sel.extra, feats.mean(dim=1, keepdim=True))


def test_trim_k_ge_n_keeps_all_without_aggregate() -> None:
    feats, img, text = _trim_example()
    sel = trim_select(feats, img, text, 8)
    assert sel.keep.tolist() == [list(range(8))] and sel.extra is None


def test_trim_text_segments_are_averaged() -> None:
    feats, _, _, img, _ = _inputs(24)
    segs = torch.randn(2, 3, 6)
    mean = F.normalize(segs, dim=-1).mean(dim=1)
    a, b = trim_select(feats, img, segs, 5), trim_select(feats, img, mean, 5)
    assert torch.equal(a.keep, b.keep)
    torch.testing.assert_close(a.info["scores"], b.info["scores"])


def test_trim_keeps_dtype_of_features() -> None:
    feats, _, _, img, txt = _inputs(24)
    sel = trim_select(feats.to(torch.bfloat16), img, txt, 5)
    assert sel.extra.dtype == torch.bfloat16


def test_trim_shape_errors_name_the_argument() -> None:
    feats, _, _, img, txt = _inputs(24)
    with pytest.raises(ValueError, match="clip_image_embeds"):
        trim_select(feats, img[:, :5], txt, 3)
    with pytest.raises(ValueError, match="clip_text_embeds"):
        trim_select(feats, img, txt[:, :4], 3)
    with pytest.raises(ValueError, match="features"):
        trim_select(feats[0], img, txt, 3)


# ---------------------------------------------------------------- PruMerge+


def test_cls_attention_from_qk_by_hand() -> None:
    # head 0: q = (1, 0), keys' first coordinate 0 (CLS), ln 2, 0 -> softmax 1/4, 2/4, 1/4
    # head 1: q = (0, 1), keys' last coordinate 0, 0, ln 3 -> 1/5, 1/5, 3/5
    q = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    ln2, ln3 = math.log(2), math.log(3)
    keys = torch.tensor([[[0.0, 0, 0, 0], [ln2, 0, 0, 0], [0, 0, 0, ln3]]])
    attn = cls_attention_from_qk(q, keys, num_heads=2, scale=1.0)
    torch.testing.assert_close(attn, torch.tensor([[(0.5 + 0.2) / 2, (0.25 + 0.6) / 2]]))
    # [B, 1, H*d] query, and the default scale d ** -0.5 (d = 2)
    default = cls_attention_from_qk(q[:, None], keys * math.sqrt(2), num_heads=2)
    torch.testing.assert_close(default, attn)


def test_cls_attention_matches_full_attention() -> None:
    g = torch.Generator().manual_seed(1)
    bsz, m, heads, d = 2, 9, 4, 8
    q, k = torch.randn(bsz, m, heads * d, generator=g), torch.randn(bsz, m, heads * d, generator=g)
    qh, kh = (t.view(bsz, m, heads, d).transpose(1, 2) for t in (q, k))
    full = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [B, H, M, M]
    expected = full[:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(cls_attention_from_qk(q[:, 0], k, heads), expected)


def _merge_example():
    """6 tokens, one-hot features; token 0 the only IQR outlier; 1, 2 closest by key."""
    feats = torch.eye(6)[None]
    keys = torch.tensor([[1, 0], [1, 0.1], [1, 0.2], [0, 1], [0.1, 1], [0.2, 1]])[None]
    attn = torch.tensor([[0.4, 0.2, 0.1, 0.1, 0.1, 0.1]])
    return feats, keys, attn


def test_prumerge_merge_weights_by_hand() -> None:
    # attention sorted .1 .1 .1 .1 .2 .4: Q1 = .1, Q3 = .175, threshold .2875 -> token 0
    feats, keys, attn = _merge_example()
    sel = prumerge_plus_select(feats, keys, attn, 2, None, num_neighbors=2)
    assert sel.info["iqr_count"].tolist() == [1]
    assert sel.keep.tolist() == [[0]]
    assert sel.info["neighbors"].tolist() == [[[1, 2]]]
    # paper: weighted average of itself and its 2 neighbours, weights = attention
    torch.testing.assert_close(sel.kept_values, torch.tensor([[[4, 2, 1, 0, 0, 0.0]]]) / 7)
    # extra: attention-weighted mean of the pruned tokens 1..5
    torch.testing.assert_close(sel.extra, torch.tensor([[[0, 2, 1, 1, 1, 1.0]]]) / 6)


def test_prumerge_code_form_is_unnormalised() -> None:
    feats, keys, attn = _merge_example()
    sel = prumerge_plus_select(feats, keys, attn, 2, None, num_neighbors=2, normalize=False)
    torch.testing.assert_close(sel.kept_values, torch.tensor([[[1, 0.2, 0.1, 0, 0, 0]]]))
    torch.testing.assert_close(sel.extra, torch.tensor([[[0, 0.2, 0.1, 0.1, 0.1, 0.1]]]))


def test_prumerge_neighbours_come_from_all_or_pruned_tokens() -> None:
    feats = torch.eye(12)[None]
    keys = torch.tensor([[1, 0], [1, 0.1], [1, 0.5]] + [[0, 1]] * 9)[None]
    attn = torch.tensor([[0.4, 0.39] + [0.01] * 10])  # 0 and 1 are the IQR outliers
    every = prumerge_plus_select(feats, keys, attn, 3, None, num_neighbors=1)
    assert every.keep.tolist() == [[0, 1]]
    assert every.info["neighbors"].tolist() == [[[1], [0]]]  # each other's nearest key
    pruned = prumerge_plus_select(feats, keys, attn, 3, None, num_neighbors=1, merge_pool="pruned")
    assert pruned.info["neighbors"].tolist() == [[[2], [2]]]
    # kept token 1 = (.39 x1 + .01 x2) / .40
    torch.testing.assert_close(pruned.kept_values[0, 1, :3], torch.tensor([0, 0.975, 0.025]))


def test_prumerge_tops_up_with_uniform_tokens() -> None:
    flat = torch.full((1, 16), 1.0 / 16)  # no outlier: exactly the uniform sample
    feats = torch.randn(1, 16, 4)
    sel = prumerge_plus_select(feats, feats, flat, 5, (4, 4))
    assert sel.info["iqr_count"].tolist() == [0]
    assert sel.keep.tolist() == [[5, 7, 13, 15]] == [uniform_indices(16, 4, (4, 4))]
    # one outlier at (0, 0): uniform points farthest from it fill the rest; the
    # closest, 5 at (1, 1), is dropped; 7 and 13 tie (sqrt 10) and both fit
    peaked = flat.clone()
    peaked[0, 0] = 1.0
    sel = prumerge_plus_select(feats, feats, peaked, 5, (4, 4))
    assert sel.info["iqr_count"].tolist() == [1]
    assert sel.keep.tolist() == [[0, 7, 13, 15]]


def test_prumerge_more_outliers_than_budget_keeps_highest() -> None:
    attn = torch.full((1, 16), 0.01)
    attn[0, [3, 9, 11]] = torch.tensor([0.5, 0.7, 0.6])
    feats = torch.randn(1, 16, 4)
    sel = prumerge_plus_select(feats, feats, attn, 3, (4, 4))
    assert sel.info["iqr_count"].tolist() == [3]
    assert sel.keep.tolist() == [[9, 11]]


def test_prumerge_zero_attention_falls_back_to_plain_mean() -> None:
    feats, keys, _ = _merge_example()
    sel = prumerge_plus_select(feats, keys, torch.zeros(1, 6), 1, None)
    torch.testing.assert_close(sel.extra, torch.full((1, 1, 6), 1 / 6))


def test_prumerge_input_errors_name_the_argument() -> None:
    feats, keys, attn = _merge_example()
    with pytest.raises(ValueError, match="grid"):
        prumerge_plus_select(feats, keys, attn, 2, (2, 2))
    with pytest.raises(ValueError, match="cls_attention"):
        prumerge_plus_select(feats, keys, -attn, 2, None)
    with pytest.raises(ValueError, match="keys"):
        prumerge_plus_select(feats, keys[:, :3], attn, 2, None)
    with pytest.raises(ValueError, match="merge_pool"):
        prumerge_plus_select(feats, keys, attn, 2, None, merge_pool="kept")
    with pytest.raises(ValueError, match="num_heads=3"):
        cls_attention_from_qk(torch.zeros(1, 4), torch.zeros(1, 5, 4), 3)


# ---------------------------------------------------------------- DivPrune


def _angles(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()[None]


def test_divprune_farthest_point_order_on_an_arc() -> None:
    # on an arc < 180 degrees, 1 - cos grows with the angle gap: points on a line
    feats = _angles([0, 10, 20, 30, 90, 100, 170])
    # nearest-neighbour gaps: 10 everywhere except 170 (70) -> first pick index 6;
    # then 0 (170 away); then 90 (min gap 80); then 30 (min gap 30)
    sel = divprune_select(feats, 4)
    assert sel.info["order"].tolist() == [[6, 0, 4, 3]]
    assert sel.keep.tolist() == [[0, 3, 4, 6]]


def test_divprune_on_a_circle_picks_a_square() -> None:
    # 12 points evenly on a circle plus a duplicate of point 0 (index 12): 0 and 12
    # have a nearest neighbour at distance 0, every other point at 30 degrees
    feats = _angles([30.0 * i for i in range(12)] + [0.0])
    order = divprune_select(feats, 4).info["order"][0].tolist()
    assert order[0] not in (0, 12)
    first = 30 * order[0]
    assert 30 * order[1] == (first + 180) % 360  # the antipode is the unique farthest
    picked = {(30 * i) % 360 for i in order}
    assert picked == {(first + 90 * j) % 360 for j in range(4)}


def test_divprune_ties_go_to_lowest_index() -> None:
    sel = divprune_select(torch.ones(1, 6, 3), 3)
    assert sel.info["order"].tolist() == [[0, 1, 2]]


def test_divprune_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 40, 5, generator=g)
    sel = divprune_select(feats, 10)
    x = F.normalize(feats, dim=-1)
    for b in range(2):
        dist = 1 - x[b] @ x[b].T
        nn = (dist + torch.eye(40) * 1e9).min(dim=1).values
        order = [int(nn.argmax())]
        while len(order) < 10:
            score = dist[:, order].min(dim=1).values
            score[order] = -1
            order.append(int(score.argmax()))
        assert sel.info["order"][b].tolist() == order


def test_nearest_neighbor_distance_is_tiled_exactly() -> None:
    feats = torch.randn(2, 37, 5, generator=torch.Generator().manual_seed(4))
    full = nearest_neighbor_distance(feats, tile=1024)
    torch.testing.assert_close(nearest_neighbor_distance(feats, tile=4), full)
    want = divprune_select(feats, 9).info["order"]
    for materialize in (True, False):
        got = divprune_order(feats, 9, materialize=materialize, tile=4)
        assert torch.equal(got, want), f"materialize={materialize}"


# ---------------------------------------------------------------- uniform


@pytest.mark.parametrize(
    "n, k, expected",
    [
        pytest.param(10, 5, [1, 3, 5, 7, 9], id="N10-k5"),
        pytest.param(10, 3, [1, 5, 8], id="N10-k3"),
        pytest.param(7, 1, [3], id="N7-k1"),
        pytest.param(5, 9, [0, 1, 2, 3, 4], id="N5-k9-all"),
    ],
)
def test_uniform_1d_bin_centres(n: int, k: int, expected: list[int]) -> None:
    assert uniform_select(n, k).keep.tolist() == [expected]


def test_uniform_grid_exact_subgrid() -> None:
    assert uniform_indices(16, 4, (4, 4)) == [5, 7, 13, 15]
    # 576 = 24 x 24, k = 144 -> every other row and column, offset 1
    keep = uniform_indices(576, 144, (24, 24))
    assert keep == [r * 24 + c for r in range(1, 24, 2) for c in range(1, 24, 2)]


@pytest.mark.parametrize(
    "grid", [(24, 24), (4, 6), (16, 40), (1, 9)], ids=lambda g: f"{g[0]}x{g[1]}"
)
def test_uniform_grid_spread(grid: tuple[int, int]) -> None:
    """For every k < N, every cell lies within 1.4 lattice spacings sqrt(N / k) of a kept
    token (an r x c sub-grid trimmed from the end would leave holes: ~1.5 on 24 x 24)."""
    h, w = grid
    cells = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
    cells = cells.view(-1, 2).float()
    for k in range(1, h * w):
        keep = uniform_indices(h * w, k, grid)
        assert len(set(keep)) == k and keep == sorted(keep), k
        covering = torch.cdist(cells, cells[torch.tensor(keep)]).min(dim=1).values.max()
        assert covering <= 1.4 * math.sqrt(h * w / k), k


def test_uniform_batch_and_determinism() -> None:
    a = uniform_select(24, 7, (4, 6), batch=3)
    assert a.keep.shape == (3, 7) and bool((a.keep == a.keep[0]).all())
    assert torch.equal(a.keep, uniform_select(24, 7, (4, 6), batch=3).keep)


def test_uniform_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"grid=\(4, 4\).*num_tokens=24"):
        uniform_select(24, 5, (4, 4))
    with pytest.raises(ValueError, match="num_tokens=0"):
        uniform_select(0, 5)
    with pytest.raises(TypeError, match="k must be an int"):
        uniform_select(24, 2.5)
