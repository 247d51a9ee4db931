"""Relevance of each visual token to the user's question (the `llm` source)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def llm_relevance(tokens: torch.Tensor, queries: list[torch.Tensor]) -> torch.Tensor:
    """[B, N, D], B x [T_b, D] -> [B, N] in [0, 1].

    `r_i = mean_t cos(v_i, e_t)` over the question's token embeddings `e_t` (the LLM's
    own input-embedding table), min-max normalised per image. An empty question gives
    all zeros (the DPP then selects for diversity alone).

    Computed as `(v_i . mean_t e_t / |e_t|) / |v_i|`: one batched matrix-vector product
    for all images instead of normalising every token and a skinny GEMM per image.
    """
    x = tokens.float()
    bsz, _, dim = x.shape
    # the question's mean unit embedding per image (zeros for an empty question)
    e_mean = torch.zeros(bsz, dim, dtype=torch.float32, device=x.device)
    for b, query in enumerate(queries):
        if query.numel():
            e_mean[b] = F.normalize(query.float().to(x.device), dim=-1).mean(dim=0)
    norms = torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-12)  # F.normalize's eps
    rel = torch.bmm(x, e_mean.unsqueeze(-1)).squeeze(-1) / norms
    lo = rel.amin(dim=1, keepdim=True)
    span = rel.amax(dim=1, keepdim=True) - lo
    return torch.where(span > 0, (rel - lo) / span.clamp_min(1e-12), torch.zeros_like(rel))
