"""Uniform spatial subsampling: the query-agnostic, content-agnostic baseline."""

from __future__ import annotations

import math

import torch

from vllm_script.methods.base import Selection


def check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name}={value} is not allowed; {name} must be an integer >= {low}")
    return value


def check_grid(grid: object, num_tokens: int) -> tuple[int, int]:
    """Validate `grid` = (h, w) with h * w == num_tokens; returns it as a tuple of ints."""
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)
    ):
        raise ValueError(f"grid={grid!r} is not allowed; grid must be (h, w) with ints >= 1")
    h, w = int(grid[0]), int(grid[1])
    if h * w != num_tokens:
        raise ValueError(
            f"grid={grid!r} has {h * w} cells but the image has num_tokens={num_tokens}; "
            f"grid must satisfy h * w == num_tokens"
        )
    return h, w


def _centres(n: int, k: int) -> list[int]:
    """k distinct positions in range(n), at the centres of k equal bins (k <= n)."""
    return [((2 * i + 1) * n) // (2 * k) for i in range(k)]


def uniform_indices(num_tokens: int, k: int, grid: tuple[int, int] | None = None) -> list[int]:
    """k distinct ascending token indices spread evenly over the image (no validation).

    1-D (grid None): index `floor((i + 1/2) * N / k)`, the centre of the i-th of k equal
    bins. 2-D (grid = (h, w), raster order): r rows at the bin centres of h, with
    r ~ sqrt(k h / w) (the aspect ratio of the image; at least ceil(k / w), at most h);
    each row gets floor(k / r) or ceil(k / r) points at the bin centres of w, the
    k mod r longer rows themselves spread by the 1-D rule. When r divides k this is a
    plain r x (k / r) sub-grid (e.g. 144 of 24 x 24: every other row and column).
    """
    if k >= num_tokens:
        return list(range(num_tokens))
    if grid is None:
        return _centres(num_tokens, k)
    h, w = grid
    rows = min(h, max(1, round(math.sqrt(k * h / w)), math.ceil(k / w)))
    base, longer = divmod(k, rows)
    plus = set(_centres(rows, longer)) if longer else set()
    out = []
    for i, row in enumerate(_centres(h, rows)):
        out += [row * w + col for col in _centres(w, base + (i in plus))]
    return out


def uniform_select(
    num_tokens: int, k: int, grid: tuple[int, int] | None = None, batch: int = 1
) -> Selection:
    """num_tokens, k -> Selection with keep LongTensor [batch, min(k, num_tokens)].

    Spatially even subsample, the same for every image of the batch and deterministic.
    `grid` = (h, w) lays the tokens out in raster order (h * w == num_tokens); without it
    the tokens are treated as a 1-D sequence. k >= num_tokens keeps every token. See
    `uniform_indices` for the exact rule.
    """
    check_int("num_tokens", num_tokens, 1)
    check_int("k", k, 1)
    check_int("batch", batch, 0)
    if grid is not None:
        grid = check_grid(grid, num_tokens)
    keep = torch.tensor(uniform_indices(num_tokens, k, grid), dtype=torch.long)
    return Selection(keep=keep.unsqueeze(0).expand(batch, -1).contiguous())
