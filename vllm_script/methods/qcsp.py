"""QCSP: query-conditioned semantic pruning by a conditional DPP (Script's second step)."""

from __future__ import annotations

import torch

from vllm_script import ops
from vllm_script.methods.base import Selection, check_reference


def dpp_quality(
    relevance: torch.Tensor | None, theta: float, reference: str = "paper"
) -> torch.Tensor | None:
    """[B, N] relevance in [0, 1] -> [B, N] quality `q_i = exp(alpha (r_i - max_j r_j))`.

    `alpha = theta / (2 (1 - theta))` (CDPruner's paper form, `exp(alpha r_i)`): `log det
    L_Y` then equals `theta / (1 - theta) * sum_Y r_i + log det S_Y` up to a constant, an
    explicit relevance/diversity trade-off; theta = 0 is pure diversity. Shifting by the
    image's largest relevance scales L by a constant, which changes no greedy step, and
    keeps q in (0, 1] for every theta < 1: `exp(alpha r)` overflows fp32 once alpha > 88
    (theta > 0.9944). `reference="code"`: `q_i = r_i`, as CDPruner's released code (theta
    unused).
    """
    check_reference(reference)
    if relevance is None:
        return None
    # NaN / inf relevance (never produced here) would become NaN gains: made 0 instead, so
    # that no input can make the selection raise or repeat a token in the worker
    r = torch.nan_to_num(relevance.float(), nan=0.0, posinf=1.0, neginf=0.0)
    if reference == "code":
        return r.clamp_min(0)
    alpha = theta / (2.0 * (1.0 - theta))
    shifted = r - r.amax(dim=-1, keepdim=True) if r.numel() else r
    return torch.exp(alpha * shifted)


def qcsp_select(
    features: torch.Tensor,
    relevance: torch.Tensor | None,
    k: int,
    *,
    theta: float = 0.5,
    candidates: torch.Tensor | None = None,
    check_candidates: bool = True,
    reference: str = "paper",
) -> Selection:
    """[B, N, D], [B, N] | None, k -> Selection of the k tokens the greedy DPP MAP picks.

    `candidates` (bool [B, N]) restricts the picks; `check_candidates=False` skips counting
    them (a GPU sync) when the caller guarantees at least k per image, as Script does.
    `reference`: the quality form, see `dpp_quality` ("code": CDPruner's `q = r`).
    """
    picks = ops.dpp_greedy_map(
        features,
        dpp_quality(relevance, theta, reference),
        k,
        candidates=candidates,
        check_values=check_candidates and candidates is not None,
    )
    return Selection(keep=picks.sort(dim=1).values, info={"order": picks})
