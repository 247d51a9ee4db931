"""Script = GSP (remove redundant tokens) then QCSP (DPP over the survivors)."""

from __future__ import annotations

import torch

from vllm_script.methods.base import Selection, check_reference
from vllm_script.methods.gsp import gsp_candidates
from vllm_script.methods.qcsp import qcsp_select
from vllm_script.methods.script_code import script_code_select


def script_select(
    features: torch.Tensor,
    relevance: torch.Tensor | None,
    k: int,
    *,
    tau: float = 0.2,
    gamma: float = 1.0,
    theta: float = 0.5,
    gsp_ratio: float = 0.5,
    reference: str = "paper",
) -> Selection:
    """[B, N, D], [B, N] | None, k -> Selection of exactly k tokens.

    Combination rule (ours; the paper intersects the two sets, the released code pads
    the intersection with DPP picks, which makes GSP a no-op): GSP first removes up to
    `gsp_ratio` of the src tokens, only redundant ones, and never more than N - k; the
    greedy DPP then picks k tokens among the survivors. So every kept token survived
    GSP and was chosen by the DPP.

    `reference="code"`: what the authors' released code keeps, see
    `vllm_script.methods.script_code` (GSP a no-op there; tau, gamma, theta, gsp_ratio
    unused).
    """
    if check_reference(reference) == "code":
        return script_code_select(features, relevance, k)
    survivors = gsp_candidates(features, k, tau=tau, gamma=gamma, ratio=gsp_ratio)
    selection = qcsp_select(
        features, relevance, k, theta=theta, candidates=survivors, check_candidates=False
    )
    selection.info["gsp_removed"] = (~survivors).sum(dim=1)
    return selection
