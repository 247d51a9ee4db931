"""Relevance of each patch to the question from CLIP embeddings (the `clip` source).

The LLM-space source (`llm`) is `vllm_script.relevance.llm_relevance`; both return
[B, N] in [0, 1], min-max normalised per image, the input QCSP / Script expect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_script.methods.trim import check_tensor


def min_max(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B, N] fp32 in [0, 1] per row; a constant row gives all zeros."""
    scores = scores.float()
    lo = scores.amin(dim=1, keepdim=True)
    span = scores.amax(dim=1, keepdim=True) - lo
    return torch.where(span > 0, (scores - lo) / span.clamp_min(1e-12), torch.zeros_like(scores))


def clip_relevance(
    clip_image_embeds: torch.Tensor,
    clip_text_embeds: torch.Tensor,
    *,
    negate: bool = False,
    normalize: bool = True,
) -> torch.Tensor:
    """[B, N, E], [B, E] or [B, T, E] -> [B, N] fp32 in [0, 1].

    `r_i = cos(image_i, text)`, min-max normalised per image. `clip_image_embeds` are
    `visual_projection(post_layernorm(patches))`; `clip_text_embeds` the projected EOT
    embedding of the question (per 77-token segment with [B, T, E]: the segments are
    L2-normalised and averaged first, as `ClipRelevance.text_embeds` does).
    `negate=True` flips the sign before the min-max, as the authors' code does (a CLIP
    quirk they rely on); the default follows the papers' text. `normalize=False` takes raw
    dot products of the embeddings as given (segments averaged unnormalised), as Script's
    released code does; CDPruner's takes cosines (the default).
    """
    check_tensor("clip_image_embeds", clip_image_embeds, 3, "[B, N, E]")
    check_tensor("clip_text_embeds", clip_text_embeds, (2, 3), "[B, E] or [B, T, E]")
    bsz, _, dim = clip_image_embeds.shape
    if clip_text_embeds.shape[0] != bsz or clip_text_embeds.shape[-1] != dim:
        raise ValueError(
            f"clip_text_embeds must have shape [B, E] or [B, T, E] with B = {bsz} and "
            f"E = {dim} (from clip_image_embeds), got {list(clip_text_embeds.shape)}"
        )
    text = clip_text_embeds.float().to(clip_image_embeds.device)
    image = clip_image_embeds.float()
    if normalize:
        if text.dim() == 3:
            text = F.normalize(text, dim=-1).mean(dim=1)
        text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    elif text.dim() == 3:
        text = text.mean(dim=1)
    sim = torch.einsum("bne,be->bn", image, text)
    return min_max(-sim if negate else sim)
