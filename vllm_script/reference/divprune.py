"""DivPrune's greedy max-min selection on `1 - cos`, in pure PyTorch.

CPU path and oracle of the Triton kernel (`vllm_script.kernels.divprune`). Rule (DivPrune,
CVPR 2025, as the authors' code orders it): the first pick is the token whose nearest other
token is farthest, `argmax_i min_{j != i} (1 - S_ij)`; then repeatedly the unpicked token
with the largest distance to its nearest picked token, kept as a running minimum. Ties go
to the lowest index, where scores within `TIE_ATOL` of the best count as ties: the two
tokens of a mutual nearest pair have equal scores in exact arithmetic, and fp32 rounding
(S_ij and S_ji summed in different places on a GPU) must not break that tie at random.
`S` is the cosine similarity of the rows in fp32 (rows L2-normalised, then dot products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Form the batch's similarity matrices once (one GEMM, B * N^2 fp32) while they take at
# most this much; above it, one [B, N] row per pick (memory-bound, O(N) extra memory).
MATERIALIZE_MAX_BYTES = 256 * 2**20
TILE = 1024  # rows of the similarity matrix formed at once for the first pick (row path)
# Distances (in [0, 2]) within this of the best are a tie, won by the lowest index.
TIE_ATOL = 1e-6


def first_best(score: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B] int64: the lowest index whose score is within TIE_ATOL of the row's best."""
    best = score.amax(dim=1, keepdim=True)
    return (score >= best - TIE_ATOL).to(torch.uint8).argmax(dim=1)


def nearest_neighbor_distance(features: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """[B, N, D] -> [B, N] fp32: each token's distance 1 - cos to its nearest other token,
    `tile` rows at a time (never N x N when N > tile). N == 1: +inf."""
    x = F.normalize(features.float(), dim=-1)
    bsz, n, _ = x.shape
    out = torch.empty(bsz, n, dtype=torch.float32, device=x.device)
    for start in range(0, n, tile):
        sim = x[:, start : start + tile] @ x.transpose(1, 2)  # [B, t, N]
        diag = torch.arange(sim.shape[1], device=x.device)
        sim[:, diag, start + diag] = float("-inf")
        out[:, start : start + sim.shape[1]] = 1.0 - sim.max(dim=2).values
    return out


def divprune_order(
    features: torch.Tensor, k: int, *, materialize: bool | None = None, tile: int = TILE
) -> torch.Tensor:
    """[B, N, D], k -> LongTensor [B, k]: the pick order (1 <= k <= N assumed).

    `materialize`: None chooses by size (`MATERIALIZE_MAX_BYTES`); True forms the
    similarity matrices once, False one row per pick (`tile` rows at a time for the first
    pick). Both give the same rule; their fp32
    sums may round differently, so an exact tie in one can be a near-tie in the other.
    """
    bsz, n, _ = features.shape
    device = features.device
    x = F.normalize(features.float(), dim=-1)
    if materialize is None:
        materialize = bsz * n * n * 4 <= MATERIALIZE_MAX_BYTES
    batch = torch.arange(bsz, device=device)
    order = torch.empty(bsz, k, dtype=torch.long, device=device)
    if materialize:
        sim = x @ x.transpose(1, 2)
        eye = torch.eye(n, dtype=torch.bool, device=device)
        order[:, 0] = first_best(1.0 - sim.masked_fill(eye, float("-inf")).amax(dim=2))
    else:
        sim = None
        order[:, 0] = first_best(nearest_neighbor_distance(x, tile))
    min_dist = torch.full((bsz, n), float("inf"), dtype=torch.float32, device=device)
    picked = torch.zeros(bsz, n, dtype=torch.bool, device=device)
    for t in range(k):
        if t:
            order[:, t] = first_best(min_dist.masked_fill(picked, float("-inf")))
        j = order[:, t]
        picked[batch, j] = True
        row = sim[batch, j] if sim is not None else torch.einsum("bnd,bd->bn", x, x[batch, j])
        torch.minimum(min_dist, 1.0 - row, out=min_dist)
    return order
