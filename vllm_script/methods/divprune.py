"""DivPrune (CVPR 2025): keep a maximally diverse subset, greedy max-min on 1 - cos."""

from __future__ import annotations

import torch

from vllm_script import ops
from vllm_script.methods.base import Selection, check_reference
from vllm_script.methods.trim import check_tensor
from vllm_script.methods.uniform import check_int


def divprune_select(features: torch.Tensor, k: int, *, reference: str = "paper") -> Selection:
    """[B, N, D], k -> Selection keeping exactly min(k, N) tokens (no merged or extra rows).

    Distance `1 - cos` (fp32). First pick: the token whose nearest neighbour is farthest
    (argmax_i min_{j != i} dist(i, j)); then repeatedly the unpicked token maximising its
    minimum distance to the picked set (`ops.divprune_order`: a running minimum, one
    similarity row per pick; Triton kernel on CUDA). Ties go to the lowest index. `keep`
    ascending; info "order" LongTensor [B, K] is the pick order. k >= N keeps every token
    (order = 0..N-1). `reference`
    ("paper" or "code") changes nothing: the authors' code picks the same tokens in the
    same order (it repeats an index past the distinct-token count; this stays distinct).
    """
    check_reference(reference)
    check_tensor("features", features, 3, "[B, N, D]")
    check_int("k", k, 1)
    bsz, n, _ = features.shape
    if k >= n:
        keep = torch.arange(n, device=features.device).expand(bsz, n).contiguous()
        return Selection(keep=keep, info={"order": keep.clone()})
    order = ops.divprune_order(features, k)
    return Selection(keep=order.sort(dim=1).values, info={"order": order})
