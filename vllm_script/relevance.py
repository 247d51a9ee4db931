"""Relevance of each visual token to the user's question (the `llm` source)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def llm_relevance(tokens: torch.Tensor, queries: list[torch.Tensor]) -> torch.Tensor:
    """[B, N, D], B x [T_b, D] -> [B, N] in [0, 1].

    `r_i = mean_t cos(v_i, e_t)` over the question's token embeddings `e_t` (the LLM's
    own input-embedding table), min-max normalised per image. An empty question gives
    all zeros (the DPP then selects for diversity alone).
    """
    v_hat = F.normalize(tokens.float(), dim=-1)
    rows = []
    for b, query in enumerate(queries):
        if query.numel() == 0:
            rows.append(torch.zeros(tokens.shape[1], device=tokens.device))
            continue
        e_hat = F.normalize(query.float(), dim=-1)
        rows.append((v_hat[b] @ e_hat.T).mean(dim=1))
    rel = torch.stack(rows)
    lo = rel.amin(dim=1, keepdim=True)
    span = rel.amax(dim=1, keepdim=True) - lo
    return torch.where(span > 0, (rel - lo) / span.clamp_min(1e-12), torch.zeros_like(rel))
