"""TRIM (arXiv 2409.10994): keep the patches CLIP finds relevant to the question.

Paper: score each patch by the softmax over patches of the cosine between its CLIP image
embedding and the question's CLIP text embedding; keep the IQR outliers; append one token,
the mean of the unselected (pre-projector) features. A serving engine needs the count
before the encoder runs, so the budget here is fixed: k = (k - 1 best-scored) + 1 aggregate,
and the count the IQR rule would have kept is reported in `info["iqr_count"]`.

The authors' code (github.com/FreedomIntelligence/TRIM, clip_encoder.py `token_reduction`)
scores by the softmax of the *negated raw dot product* of the projected image embeddings
and the text embedding of the question truncated to one CLIP context, and keeps
`int(N * (c / N))` patches, c = the IQR outliers by numpy's percentiles
(`reference="code"`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vllm_script.methods.base import Selection, check_reference
from vllm_script.methods.uniform import check_int


def check_tensor(name: str, value: object, dims: int | tuple[int, ...], shape: str) -> torch.Tensor:
    """Raise TypeError/ValueError naming `name` unless `value` is a float tensor of `dims`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    dims = (dims,) if isinstance(dims, int) else dims
    if value.dim() not in dims:
        raise ValueError(f"{name} must have shape {shape}, got {list(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got dtype {value.dtype}")
    return value


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] -> bool [B, N]: scores above Q3 + 1.5 * (Q3 - Q1), per row.

    Quartiles by linear interpolation (`torch.quantile`'s and numpy's default).
    """
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75]).to(scores.device), dim=1)
    return scores.float() > (q3 + 1.5 * (q3 - q1)).unsqueeze(1)


def code_iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] -> bool [B, N]: the authors' outlier rule (TRIM and PruMerge+), per image.

    `score > Q3 + 1.5 (Q3 - Q1)` with Q1, Q3 from `np.percentile` (linear) of the fp32
    scores, as their `outlier_detection` does (it flattens the whole batch; the batch is
    one image in their evaluation, so here each image is its own).
    """
    values = scores.detach().float().cpu().numpy()
    if values.shape[0] == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    rows = []
    for row in values:
        q1, q3 = float(np.percentile(row, 25)), float(np.percentile(row, 75))
        rows.append(row > q3 + 1.5 * (q3 - q1))
    return torch.from_numpy(np.stack(rows)).to(scores.device)


def code_count(outliers: torch.Tensor) -> torch.Tensor:
    """bool [B, N] -> LongTensor [B]: `int(N * (c / N))` in float64, as the code computes
    its kept count from the outlier ratio (it can be c - 1, e.g. N = 2880, c = 13)."""
    n = outliers.shape[1]
    counts = outliers.sum(dim=1).tolist()
    return torch.tensor([int(n * (c / n)) for c in counts], device=outliers.device)


def trim_scores(
    clip_image_embeds: torch.Tensor,
    clip_text_embeds: torch.Tensor,
    *,
    negate: bool | None = None,
    reference: str = "paper",
) -> torch.Tensor:
    """[B, N, E], [B, E] or [B, T, E] -> [B, N] fp32: softmax over patches of the similarity.

    "paper": cosine(patch, text); [B, T, E] text embeddings (one per 77-token segment)
    are L2-normalised and averaged over T first. "code": the raw dot product of the
    embeddings as given, with the first segment of [B, T, E] (the code truncates the
    question to one CLIP context). `negate` (None: True for "code", False for "paper")
    negates the similarity before the softmax, as the authors' code does.
    """
    check_reference(reference)
    negate = (reference == "code") if negate is None else negate
    text, image = clip_text_embeds.float(), clip_image_embeds.float()
    if reference == "code":
        sim = torch.einsum("bne,be->bn", image, text[:, 0] if text.dim() == 3 else text)
    else:
        if text.dim() == 3:
            text = F.normalize(text, dim=-1).mean(dim=1)
        sim = torch.einsum("bne,be->bn", F.normalize(image, dim=-1), F.normalize(text, dim=-1))
    return torch.softmax(-sim if negate else sim, dim=1)


def trim_select(
    features: torch.Tensor,
    clip_image_embeds: torch.Tensor,
    clip_text_embeds: torch.Tensor,
    k: int,
    *,
    negate: bool | None = None,
    reference: str = "paper",
) -> Selection:
    """[B, N, Dv], [B, N, E], [B, E] | [B, T, E], k -> Selection of exactly min(k, N) tokens.

    `features`: the pre-projector patch features; `extra` is built from them (the caller
    projects it like the kept tokens). Scores: `trim_scores` ("paper": softmax over
    patches of the cosine to the question; "code": of the negated raw dot product;
    `negate` overrides the sign).

    - k >= N: every token is kept, no aggregate (`extra` None).
    - 1 <= k < N: the k - 1 best-scored tokens (ties to the lowest index; `keep`
      ascending) plus `extra` [B, 1, Dv] = mean of the N - k + 1 unselected rows of
      `features` (computed in fp32, returned in the features' dtype). So k == 1 gives
      no kept token and one aggregate of the whole image.

    info: "iqr_count" LongTensor [B], how many patches the IQR rule (score > Q3 + 1.5
    IQR) would have kept ("code": the code's adaptive count, `code_count`); "scores"
    [B, N] fp32. "code" also gives "code_tokens" = iqr_count + 1, the rows the authors'
    code passes to the LLM: with that budget `keep` and `extra` are exactly the code's.
    """
    check_reference(reference)
    check_tensor("features", features, 3, "[B, N, Dv]")
    check_tensor("clip_image_embeds", clip_image_embeds, 3, "[B, N, E]")
    check_tensor("clip_text_embeds", clip_text_embeds, (2, 3), "[B, E] or [B, T, E]")
    check_int("k", k, 1)
    bsz, n, _ = features.shape
    if tuple(clip_image_embeds.shape[:2]) != (bsz, n):
        raise ValueError(
            f"clip_image_embeds must have shape [B, N, E] with B, N = {bsz}, {n} "
            f"(from features), got {list(clip_image_embeds.shape)}"
        )
    if (
        clip_text_embeds.shape[0] != bsz
        or clip_text_embeds.shape[-1] != clip_image_embeds.shape[-1]
    ):
        raise ValueError(
            f"clip_text_embeds must have shape [B, E] or [B, T, E] with B = {bsz} and "
            f"E = {clip_image_embeds.shape[-1]} (from clip_image_embeds), "
            f"got {list(clip_text_embeds.shape)}"
        )
    if clip_text_embeds.dim() == 3 and clip_text_embeds.shape[1] == 0:
        raise ValueError("clip_text_embeds has T = 0 segments; at least one is required")
    scores = trim_scores(clip_image_embeds, clip_text_embeds, negate=negate, reference=reference)
    if reference == "code":
        count = code_count(code_iqr_outliers(scores))
        info = {"iqr_count": count, "code_tokens": count + 1, "scores": scores}
    else:
        info = {"iqr_count": iqr_outliers(scores).sum(dim=1), "scores": scores}
    device = features.device
    if k >= n:
        keep = torch.arange(n, device=device).expand(bsz, n).contiguous()
        return Selection(keep=keep, info=info)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    keep = order[:, : k - 1].sort(dim=1).values
    unselected = torch.ones(bsz, n, dtype=torch.bool, device=device).scatter(1, keep, False)
    weights = unselected.float().unsqueeze(-1) / (n - k + 1)
    extra = (features.float() * weights).sum(dim=1, keepdim=True).to(features.dtype)
    return Selection(keep=keep, extra=extra, info=info)
