"""Script as its authors' released code selects (`script_select(..., reference="code")`).

The released code (github.com/01yzzyu/script.github.io, Script/llava/model/llava_arch.py,
commit 7e5e2f3) computes a GSP mask, a Gram-Schmidt DPP and a second "DPP-based greedy
MAP", then returns the intersection of the GSP mask with the second DPP's set padded with
that set's other tokens, which is that set itself: GSP changes nothing. The second DPP is
not the exact greedy MAP: each step subtracts `L[:, j]^2 / (sqrt(d_j) + 1e-6)^2` from
the gains without the cross terms of earlier picks (its coefficient divides by the
already-selected gain, -inf, and vanishes), and once the best remaining gain is <= 0 it
stops updating and takes the rest by that frozen gain. Its first release (a384841) was
CDPruner's exact DPP verbatim: `method: "qcsp", reference: "code"` reproduces that one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_script.methods.base import Selection
from vllm_script.methods.trim import check_tensor


def script_code_select(features: torch.Tensor, relevance: torch.Tensor | None, k: int) -> Selection:
    """[B, N, D], [B, N] | None, k -> Selection of the k tokens Script's released code keeps.

    `L = diag(r) S diag(r)`, S the cosine of the rows (fp32), r the relevance (None: ones).
    `d <- diag(L)`; k times: `j = argmax` of d over the unpicked tokens (ties to the lowest
    index); if `d_j > 0`: `d <- d - (L[:, j] / (sqrt(d_j) + 1e-6))^2`. `keep` ascending
    (the code passes its mask in spatial order); info "order": the pick order.
    Raises ValueError unless 1 <= k <= N (as the DPP of `qcsp_select`).
    """
    check_tensor("features", features, 3, "[B, N, D]")
    bsz, n, _ = features.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an integer in [1, {n}] (the number of tokens)")
    if relevance is not None:
        if tuple(relevance.shape) != (bsz, n):
            raise ValueError(
                f"relevance must have shape [B, N] = {[bsz, n]}, got {list(relevance.shape)}"
            )
        if not torch.isfinite(relevance).all() or (relevance < 0).any():
            raise ValueError("relevance must be finite and non-negative")
    device = features.device
    x = F.normalize(features.float(), dim=-1)
    f32 = torch.float32
    q = torch.ones(bsz, n, dtype=f32, device=device) if relevance is None else relevance.float()
    gain = q * (x * x).sum(dim=-1) * q
    picked = torch.zeros(bsz, n, dtype=torch.bool, device=device)
    order = torch.empty(bsz, k, dtype=torch.long, device=device)
    batch = torch.arange(bsz, device=device)
    for t in range(k):
        j = gain.masked_fill(picked, float("-inf")).argmax(dim=1)
        order[:, t] = j
        picked[batch, j] = True
        best = gain[batch, j]
        column = (q * torch.einsum("bnd,bd->bn", x, x[batch, j])) * q[batch, j].unsqueeze(1)
        step = column / (best.clamp_min(0).sqrt() + 1e-6).unsqueeze(1)
        gain = torch.where((best > 0).unsqueeze(1), gain - step.square(), gain)
    return Selection(keep=order.sort(dim=1).values, info={"order": order})
