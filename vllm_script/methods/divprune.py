"""DivPrune (CVPR 2025): keep a maximally diverse subset, greedy max-min on 1 - cos."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_script.methods.base import Selection, check_reference
from vllm_script.methods.trim import check_tensor
from vllm_script.methods.uniform import check_int

TILE = 1024  # rows of the similarity matrix formed at once for the first pick


def nearest_neighbor_distance(features: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """[B, N, D] -> [B, N] fp32: each token's distance 1 - cos to its nearest other token.

    Formed `tile` rows at a time ([B, tile, N] at most, never N x N when N > tile).
    N == 1 has no other token: +inf.
    """
    bsz, n, _ = features.shape
    x = F.normalize(features.float(), dim=-1)
    out = torch.empty(bsz, n, device=features.device)
    for start in range(0, n, tile):
        rows = x[:, start : start + tile]
        sim = rows @ x.transpose(1, 2)  # [B, t, N]
        t = rows.shape[1]
        diag = torch.arange(t, device=features.device)
        sim[:, diag, start + diag] = float("-inf")
        out[:, start : start + t] = 1.0 - sim.max(dim=2).values
    return out


def divprune_select(
    features: torch.Tensor, k: int, *, tile: int = TILE, reference: str = "paper"
) -> Selection:
    """[B, N, D], k -> Selection keeping exactly min(k, N) tokens (no merged or extra rows).

    Distance `1 - cos` (fp32). First pick: the token whose nearest neighbour is farthest
    (argmax_i min_{j != i} dist(i, j)); then repeatedly the unpicked token maximising its
    minimum distance to the picked set, kept as a running minimum (one [B, N] row per
    pick: O(K N D) time, O(N) memory beyond a `tile` x N block for the first pick).
    Ties go to the lowest index. `keep` ascending; info "order" LongTensor [B, K] is the
    pick order. k >= N keeps every token (order = 0..N-1). `reference` ("paper" or
    "code") changes nothing: the authors' code picks the same tokens in the same order
    (it repeats an index past the distinct-token count; this stays distinct).
    """
    check_reference(reference)
    check_tensor("features", features, 3, "[B, N, D]")
    check_int("k", k, 1)
    check_int("tile", tile, 1)
    bsz, n, _ = features.shape
    device = features.device
    if k >= n:
        keep = torch.arange(n, device=device).expand(bsz, n).contiguous()
        return Selection(keep=keep, info={"order": keep.clone()})
    x = F.normalize(features.float(), dim=-1)
    batch = torch.arange(bsz, device=device)
    order = torch.empty(bsz, k, dtype=torch.long, device=device)
    order[:, 0] = nearest_neighbor_distance(features, tile).argmax(dim=1)
    min_dist = torch.full((bsz, n), float("inf"), device=device)
    picked = torch.zeros(bsz, n, dtype=torch.bool, device=device)
    for t in range(k):
        if t:
            order[:, t] = min_dist.masked_fill(picked, float("-inf")).argmax(dim=1)
        j = order[:, t]
        picked[batch, j] = True
        dist = 1.0 - torch.einsum("bnd,bd->bn", x, x[batch, j])
        min_dist = torch.minimum(min_dist, dist)
    return Selection(keep=order.sort(dim=1).values, info={"order": order})
