"""Script = GSP (remove redundant tokens) then QCSP (DPP over the survivors)."""

from __future__ import annotations

import torch

from vllm_script import ops
from vllm_script.methods.base import Selection, check_reference
from vllm_script.methods.gsp import gsp_candidates
from vllm_script.methods.qcsp import dpp_quality, qcsp_select
from vllm_script.methods.script_code import script_code_select
from vllm_script.reference import bipartite, dpp


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
    shared_gram: bool = True,
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

    On the compiled CPU path the DPP reads the dots GSP's GEMM computed (see
    `_shared_gram_cpu`); `shared_gram=False` runs the two steps apart, for comparison.
    """
    if check_reference(reference) == "code":
        return script_code_select(features, relevance, k)
    if shared_gram and ops.runs_compiled_cpu(features) and features.shape[0]:
        return _shared_gram_cpu(features, relevance, k, tau, gamma, theta, gsp_ratio)
    survivors = gsp_candidates(features, k, tau=tau, gamma=gamma, ratio=gsp_ratio)
    selection = qcsp_select(
        features, relevance, k, theta=theta, candidates=survivors, check_candidates=False
    )
    selection.info["gsp_removed"] = (~survivors).sum(dim=1)
    return selection


def _shared_gram_cpu(features, relevance, k, tau, gamma, theta, gsp_ratio) -> Selection:
    """`script_select` on the compiled CPU path, one image at a time: the DPP reads the
    dots of GSP's GEMM (every even x odd pair) instead of recomputing them, so it
    computes only the dots of same-parity pairs. Same rule; the dots are the same fp32
    values summed in BLAS's order, so picks can differ from separate GSP and QCSP calls
    only at gains within fp32 rounding of a tie."""
    # the checks the separate calls make (the compiled loop indexes without bounds checks)
    quality = dpp_quality(relevance, theta)
    ops.check_dpp_inputs(features, quality, k, check_values=False)
    ops.check_tau(tau)
    orders, removed = [], []
    for b in range(features.shape[0]):
        image = features[b : b + 1]
        stats, dots = bipartite.cpu_stats_and_dots(image, tau)
        survivors = gsp_candidates(image, k, tau=tau, gamma=gamma, ratio=gsp_ratio, stats=stats)
        q = None if quality is None else quality[b : b + 1]
        orders.append(
            dpp.dpp_greedy_map_compiled(image, q, k, candidates=survivors, cross_dots=dots)
        )
        removed.append((~survivors).sum(dim=1))
    order = torch.cat(orders)
    return Selection(
        keep=order.sort(dim=1).values,
        info={"order": order, "gsp_removed": torch.cat(removed)},
    )
