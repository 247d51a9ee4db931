"""PruMerge+ (LLaVA-PruMerge, arXiv 2403.15388): keep CLS-attention outliers + uniform tokens,
merge the rest into them.

Paper vs the authors' code (github.com/42Shawn/LLaVA-PruMerge, clip_encoder.py
`token_prune_merge_advanced_plus`): the paper merges each kept token's cluster by a
weighted *average* (weights = CLS attention); the code adds the attention-weighted *sum*
of the neighbours to the unchanged kept token and makes the extra token an unnormalised
attention-weighted sum (`normalize=False`). Both draw a kept token's neighbours from every
other token (kept or pruned); `merge_pool="pruned"` restricts them to the pruned tokens.
The code's kept list (`reference="code"`, `code_keep_order`) is the outliers by
descending attention, then every s-th token in raster order that is not an outlier; the
paper's (default) the outliers topped up from a 2-D sub-grid, in spatial order.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from vllm_script.methods.base import Selection, check_reference
from vllm_script.methods.trim import check_tensor, code_count, code_iqr_outliers, iqr_outliers
from vllm_script.methods.uniform import check_grid, check_int, uniform_indices

NUM_NEIGHBORS = 32  # the paper's cluster size


def cls_attention_from_qk(
    cls_query: torch.Tensor,
    keys: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    num_prefix: int = 1,
) -> torch.Tensor:
    """[B, H*d] (or [B, 1, H*d]), [B, M, H*d] -> [B, M - num_prefix] fp32: CLS attention.

    Recomputes what the attention layer would have returned as weights (vLLM's does not):
    per head h, `softmax_m(scale * <q_h, k_{m,h}>)` over all M keys (the CLS key included,
    as in the layer), averaged over heads; then the first `num_prefix` columns (the CLS /
    prefix keys) are dropped, without renormalising. `scale` defaults to d ** -0.5 with
    d = width / num_heads. The authors' code uses one full-width head (`num_heads=1`, the
    scale then being width ** -0.5).
    """
    check_tensor("cls_query", cls_query, (2, 3), "[B, H*d] or [B, 1, H*d]")
    check_tensor("keys", keys, 3, "[B, M, H*d]")
    check_int("num_heads", num_heads, 1)
    check_int("num_prefix", num_prefix, 0)
    if cls_query.dim() == 3:
        if cls_query.shape[1] != 1:
            raise ValueError(
                f"cls_query must have shape [B, H*d] or [B, 1, H*d], got {list(cls_query.shape)}"
            )
        cls_query = cls_query[:, 0]
    bsz, m, width = keys.shape
    if tuple(cls_query.shape) != (bsz, width):
        raise ValueError(
            f"cls_query must have shape [B, H*d] = {[bsz, width]} (from keys), "
            f"got {list(cls_query.shape)}"
        )
    if width % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the key width {width}")
    if num_prefix >= m:
        raise ValueError(f"num_prefix={num_prefix} must be < the number of keys M={m}")
    d = width // num_heads
    scale = d**-0.5 if scale is None else float(scale)
    q = cls_query.float().view(bsz, num_heads, d)
    kh = keys.float().view(bsz, m, num_heads, d)
    logits = torch.einsum("bhd,bmhd->bhm", q, kh) * scale
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, num_prefix:]


def _positions(n: int, grid: tuple[int, int] | None) -> torch.Tensor:
    """[n, 2] fp32 spatial coordinates (row, col) of the tokens in raster order."""
    idx = torch.arange(n)
    if grid is None:
        return torch.stack([torch.zeros(n), idx.float()], dim=1)
    return torch.stack([(idx // grid[1]).float(), (idx % grid[1]).float()], dim=1)


def select_outliers_plus_uniform(
    cls_attention: torch.Tensor, m: int, grid: tuple[int, int] | None
) -> torch.Tensor:
    """[B, N], m -> LongTensor [B, m] ascending: PruMerge+'s kept set (no validation).

    IQR outliers of the attention; more than m outliers -> the m highest (ties to the
    lowest index). Fewer -> topped up from the m-point uniform sample (`uniform_indices`)
    minus the outliers, farthest (Euclidean, on the grid) from any outlier first, ties to
    the lowest index; with no outlier that is the uniform sample itself.
    """
    bsz, n = cls_attention.shape
    if m == 0:
        return torch.empty(bsz, 0, dtype=torch.long, device=cls_attention.device)
    outlier = iqr_outliers(cls_attention).cpu()
    order = torch.sort(cls_attention.float(), dim=1, descending=True, stable=True).indices.cpu()
    uniform = torch.tensor(uniform_indices(n, m, grid), dtype=torch.long)
    pos = _positions(n, grid)
    rows = []
    for b in range(bsz):
        count = int(outlier[b].sum())
        if count >= m:
            rows.append(order[b, :m])
            continue
        picked = outlier[b].nonzero().flatten()
        fill = uniform[~outlier[b, uniform]]
        if count:
            dist = torch.cdist(pos[fill], pos[picked]).min(dim=1).values
            fill = fill[torch.sort(dist, descending=True, stable=True).indices]
        rows.append(torch.cat([picked, fill[: m - count]]))
    return torch.stack(rows).sort(dim=1).values.to(cls_attention.device)


def code_stride(num_outliers: int, n: int) -> int:
    """The code's raster stride s = int(int(1 / (c / N)) / 3), in float64 as it computes it.

    Where the code fails, the safe limit: c = 0 (it divides by zero) gives s = N (only
    token 0), and s = 0 (c > N / 3: `arange` with step 0 raises) gives s = 1.
    """
    if num_outliers == 0:
        return n
    return max(1, int(int(1 / (num_outliers / n)) / 3))


def code_keep_order(
    cls_attention: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, N], m -> (keep [B, m], iqr_count [B], code_tokens [B]): the code's kept list.

    The code keeps `c' = int(N * (c / N))` tokens of highest attention (c = IQR outliers
    by `code_iqr_outliers`), in descending attention (ties to the lowest index), then the
    positions `0, s, 2s, ... < N - 1` (`code_stride`; the code's bound is 575 for N = 576)
    that are not among them, ascending; `code_tokens` = that list's length + 1 (the extra
    token). `keep` is the list's first m entries, or the list then the remaining tokens by
    descending attention when m is longer: with `m = code_tokens - 1` it is the code's
    list exactly, in the order the code passes the tokens to the LLM.
    """
    bsz, n = cls_attention.shape
    order = torch.sort(cls_attention.float(), dim=1, descending=True, stable=True).indices.cpu()
    outlier_mask = code_iqr_outliers(cls_attention)
    counts = code_count(outlier_mask).cpu()
    outliers = outlier_mask.sum(dim=1).tolist()
    rows, tokens = [], []
    for b in range(bsz):
        top = order[b, : int(counts[b])]
        is_top = torch.zeros(n, dtype=torch.bool).scatter(0, top, True)
        stride = torch.arange(0, n - 1, code_stride(int(outliers[b]), n))
        listed = torch.cat([top, stride[~is_top[stride]]])
        tokens.append(listed.numel() + 1)
        listed_mask = torch.zeros(n, dtype=torch.bool).scatter(0, listed, True)
        rest = order[b][~listed_mask[order[b]]]
        rows.append(torch.cat([listed, rest])[:m])
    device = cls_attention.device
    keep = (
        torch.stack(rows).to(device) if rows else torch.empty(0, m, dtype=torch.long, device=device)
    )
    return keep, counts.to(device), torch.tensor(tokens, dtype=torch.long, device=device)


def _weighted_mean(
    weights: torch.Tensor, support: torch.Tensor, values: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """[B, R, N] weights, bool [B, R, N] support, [B, N, D] -> [B, R, D] fp32.

    normalize=False: `weights @ values`. normalize=True: the weighted mean; a row whose
    weights sum to 0 (all-zero attention) takes the plain mean over its `support`.
    """
    if not normalize:
        return weights @ values
    total = weights.sum(dim=-1, keepdim=True)
    weights = torch.where(total > 0, weights, support.float())
    return (weights @ values) / weights.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def prumerge_plus_select(
    features: torch.Tensor,
    keys: torch.Tensor,
    cls_attention: torch.Tensor,
    k: int,
    grid: tuple[int, int] | None,
    *,
    num_neighbors: int = NUM_NEIGHBORS,
    normalize: bool | None = None,
    merge_pool: Literal["all", "pruned"] = "all",
    reference: str = "paper",
) -> Selection:
    """[B, N, Dv], [B, N, Dk], [B, N], k, (h, w) -> Selection of exactly min(k, N) tokens.

    `features`: the patch features to merge (pre-projector); `keys`: the same layer's
    patch keys (CLS excluded), used only for the key-cosine neighbourhoods;
    `cls_attention`: CLS -> patch attention, >= 0 (see `cls_attention_from_qk`);
    `grid`: the patches' (h, w) layout in raster order, or None for a 1-D layout.

    - k >= N: every token kept as is (no merge, no extra token).
    - 1 <= k < N: m = k - 1 tokens kept by `select_outliers_plus_uniform` (`keep`
      ascending), or under "code" by `code_keep_order` (`keep` in the code's order, the
      order the LLM receives them); each kept token i is merged with its
      `num_neighbors` nearest tokens j
      by key cosine (from all other tokens, or only the pruned ones with
      `merge_pool="pruned"`; fewer if fewer exist; ties to the lowest index):
      `kept_values_i = (a_i x_i + sum_j a_j x_j) / (a_i + sum_j a_j)` (paper), or
      `x_i + sum_j a_j x_j` (code, `normalize=False`). `extra` [B, 1, Dv] =
      `sum_p a_p x_p / sum_p a_p` over the pruned tokens p (code: not divided).
      k == 1 therefore gives only the extra token, the attention-weighted mean of all.
      With `normalize`, a zero weight sum falls back to the plain mean of the group.
      `normalize` None: True for "paper", False for "code".

    info: "iqr_count" LongTensor [B] (the IQR outlier count, PruMerge's adaptive size;
    "code": the number of outliers the code keeps); "neighbors" LongTensor
    [B, k - 1, n_nb], each kept token's merged neighbours. "code" also gives
    "code_tokens" [B], the rows the authors' code passes to the LLM (outliers + stride
    tokens + 1 extra): with that budget the rows are exactly the code's.
    """
    check_reference(reference)
    if normalize is None:
        normalize = reference == "paper"
    check_tensor("features", features, 3, "[B, N, Dv]")
    check_tensor("keys", keys, 3, "[B, N, Dk]")
    check_tensor("cls_attention", cls_attention, 2, "[B, N]")
    check_int("k", k, 1)
    check_int("num_neighbors", num_neighbors, 0)
    if merge_pool not in ("all", "pruned"):
        raise ValueError(f"merge_pool={merge_pool!r} is not allowed; use 'all' or 'pruned'")
    bsz, n, _ = features.shape
    if tuple(keys.shape[:2]) != (bsz, n):
        raise ValueError(
            f"keys must have shape [B, N, Dk] with B, N = {bsz}, {n} (from features), "
            f"got {list(keys.shape)}"
        )
    if tuple(cls_attention.shape) != (bsz, n):
        raise ValueError(
            f"cls_attention must have shape [B, N] = {[bsz, n]} (from features), "
            f"got {list(cls_attention.shape)}"
        )
    if not torch.isfinite(cls_attention).all() or (cls_attention < 0).any():
        raise ValueError("cls_attention must be finite and >= 0 (attention probabilities)")
    if grid is not None:
        grid = check_grid(grid, n)
    device = features.device
    m = min(k, n) - 1
    if reference == "code":
        code_keep, count, tokens = code_keep_order(cls_attention, m)
        info = {"iqr_count": count, "code_tokens": tokens}
    else:
        info = {"iqr_count": iqr_outliers(cls_attention).sum(dim=1)}
    if k >= n:
        return Selection(keep=torch.arange(n, device=device).expand(bsz, n).contiguous(), info=info)

    if reference == "code":
        keep = code_keep
    else:
        keep = select_outliers_plus_uniform(cls_attention, m, grid)
    kept_mask = torch.zeros(bsz, n, dtype=torch.bool, device=device).scatter(1, keep, True)
    attn = cls_attention.float()
    values = features.float()

    # key-cosine neighbourhoods of the kept tokens: [B, m, N], never N x N
    k_norm = F.normalize(keys.float(), dim=-1)
    kept_keys = k_norm.gather(1, keep.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
    sim = kept_keys @ k_norm.transpose(1, 2)
    banned = torch.zeros(bsz, m, n, dtype=torch.bool, device=device)
    banned.scatter_(2, keep.unsqueeze(-1), True)  # itself
    if merge_pool == "pruned":
        banned |= kept_mask.unsqueeze(1)
    pool = n - (m if merge_pool == "pruned" else 1)
    n_nb = min(num_neighbors, pool)
    sim = sim.masked_fill(banned, float("-inf"))
    neighbors = torch.sort(sim, dim=2, descending=True, stable=True).indices[:, :, :n_nb]

    support = torch.zeros(bsz, m, n, dtype=torch.bool, device=device)
    support.scatter_(2, neighbors, True)
    weights = attn.unsqueeze(1) * support.float()
    if normalize:  # the paper's cluster average includes the kept token itself
        support.scatter_(2, keep.unsqueeze(-1), True)
        weights = attn.unsqueeze(1) * support.float()
    merged = _weighted_mean(weights, support, values, normalize)
    if not normalize:
        merged = merged + values.gather(1, keep.unsqueeze(-1).expand(-1, -1, values.shape[-1]))

    pruned = (~kept_mask).unsqueeze(1)  # [B, 1, N]
    extra = _weighted_mean(attn.unsqueeze(1) * pruned.float(), pruned, values, normalize)
    info["neighbors"] = neighbors
    return Selection(
        keep=keep,
        kept_values=merged.to(features.dtype),
        extra=extra.to(features.dtype),
        info=info,
    )
