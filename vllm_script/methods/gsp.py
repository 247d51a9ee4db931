"""GSP: graph-structured pruning, Script's redundancy step (bipartite, ToMe-style split)."""

from __future__ import annotations

import torch

from vllm_script import ops
from vllm_script.methods.base import Selection, gather_rows
from vllm_script.reference import BipartiteStats

# below this degree the code blends in the mean similarity to all dst tokens
LOW_DEGREE = 4


def gsp_scores(
    features: torch.Tensor, tau: float, gamma: float, stats: BipartiteStats | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, D] -> (scores, degree), each [B, ceil(N/2)]: redundancy of each src token.

    `r_i = d_i * exp(gamma * (mu_i - tau))` with `d_i` the number of dst tokens (odd
    index) whose cosine to i is >= tau and `mu_i` their mean cosine; for `d_i < 4` the
    authors' code blends `r_i = 0.5 r_i + 0.5 mean_j S_ij` (the paper's formula is cut
    off in every copy; this is the released code's form). `stats`: the features'
    bipartite statistics at `tau`, when the caller has them already.
    """
    stats = ops.bipartite_stats(features, tau) if stats is None else stats
    degree = stats.degree.float()
    n_dst = features.shape[1] // 2
    mean_edge = torch.where(degree > 0, stats.edge_sum / degree.clamp_min(1), 0.0)
    score = degree * torch.exp(gamma * (mean_edge - tau))
    mean_all = stats.total_sum / max(n_dst, 1)
    score = torch.where(degree < LOW_DEGREE, 0.5 * score + 0.5 * mean_all, score)
    return score, stats.degree


def redundancy_order(scores: torch.Tensor) -> torch.Tensor:
    """[B, N_src] -> [B, N_src]: src positions, most redundant first, ties to lowest index."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def gsp_select(
    features: torch.Tensor, k: int, *, tau: float = 0.2, gamma: float = 1.0
) -> Selection:
    """[B, N, D], k -> Selection keeping exactly k tokens, by GSP alone.

    Each round removes the most redundant src tokens of the survivors (re-split by
    alternating index), at most ceil(n/2) per round, until k remain. dst tokens of a
    round are never removed in that round. A round that removes every src token needs
    no scores (at 576 -> 64 the first three do: only the fourth, on 72 tokens, scores).
    """
    bsz, n, dim = features.shape
    alive = torch.arange(n, device=features.device).expand(bsz, n)
    while alive.shape[1] > k:
        if alive.shape[1] - k >= (alive.shape[1] + 1) // 2:
            alive = alive[:, 1::2]  # every src token goes, whatever its score
            continue
        sub = features if alive.shape[1] == n else gather_rows(features, alive)
        order = redundancy_order(gsp_scores(sub, tau, gamma)[0])
        n_remove = min(alive.shape[1] - k, order.shape[1])
        drop = 2 * order[:, :n_remove]  # src position i is token 2i of the round
        dropped = torch.zeros_like(alive, dtype=torch.int8).scatter(1, drop, 1)
        # survivors first, in order (a stable sort, not a boolean index: no GPU sync)
        kept = torch.argsort(dropped, dim=1, stable=True)[:, : alive.shape[1] - n_remove]
        alive = alive.gather(1, kept)
    return Selection(keep=alive.sort(dim=1).values)


def gsp_candidates(
    features: torch.Tensor,
    k: int,
    *,
    tau: float,
    gamma: float,
    ratio: float,
    stats: BipartiteStats | None = None,
) -> torch.Tensor:
    """[B, N, D], k -> bool [B, N]: tokens that survive one GSP pass (Script's first step).

    Removes, per image, the `min(N - k, floor(ratio * ceil(N/2)), #src with an edge)` most
    redundant src tokens: at least k tokens always survive, and a src token with no edge
    >= tau (nothing similar to it) is never removed. `stats`: as in `gsp_scores`.
    """
    bsz, n, _ = features.shape
    scores, degree = gsp_scores(features, tau, gamma, stats)
    n_src = scores.shape[1]
    has_edge = degree > 0
    limit = min(n - k, int(ratio * n_src))
    n_remove = has_edge.sum(dim=1).clamp(max=limit)  # [B]
    order = redundancy_order(scores.masked_fill(~has_edge, float("-inf")))
    rank_ok = torch.arange(n_src, device=features.device).unsqueeze(0) < n_remove.unsqueeze(1)
    drop = 2 * order
    survivors = torch.ones(bsz, n, dtype=torch.bool, device=features.device)
    survivors.scatter_(1, drop, ~rank_ok)
    return survivors
