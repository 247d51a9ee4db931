"""Exact fast greedy MAP inference for a conditional DPP, in pure PyTorch.

This is the CPU path and the oracle of the Triton kernel (`vllm_script.kernels.dpp`).
Algorithm: Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point
Process", NeurIPS 2018 (incremental Cholesky; each step is the exact greedy log-det step),
run lazily and blocked so that no N x N matrix is formed and the kernel rows are computed
by GEMMs instead of one memory-bound matrix-vector product per step.

Arithmetic shared with the kernel (so both pick the same indices on the same inputs):
    w_i   = q_i / max(||f_i||, 1e-12)                       (fp32)
    L_ij  = ((f_i . f_j) * w_i) * w_j                        (dot in fp32)
    L_ii  = ((f_i . f_i) * w_i) * w_i                        (initial gain)
    e_i   = (L_ji - sum_s C[s, j] C[s, i]) / sqrt(gain_j)    (new Cholesky row)
    gain_i <- gain_i - e_i^2                                  (monotone non-increasing)
A gain at or below `GAIN_EPS * max_i L_ii` counts as zero (the fill rule takes over).
"""

from __future__ import annotations

import torch

from vllm_script.cpu_threads import selection_threads
from vllm_script.reference import dpp_cpu

# A gain d_i^2 at or below GAIN_EPS * max_i L_ii is treated as zero: fp32 Cholesky
# updates leave ~1e-7 noise where the true gain is 0 (duplicates, rank deficiency).
GAIN_EPS = 1e-5
# Gains within TIE_RTOL * max_i L_ii of the best are a tie, won by the lowest index.
# Exact duplicates have equal gains in exact arithmetic, but fp32 rounding depends on the
# order of operations (a GEMM's blocking, a GPU's reduction tree), so an exact `argmax`
# would break their ties at random; this window makes kernel and twin agree.
TIE_RTOL = 1e-6

# Picks kept pending before their Cholesky rows are applied to every live token at once
# (one [N, D] x [D, BLOCK] GEMM); between two commits only the few tokens that reach the
# top of the lazy queue are brought up to date.
COMMIT_BLOCK = 32
# Stale tokens refreshed together when the top of the queue is stale.
REFRESH = 16
# Rows of `features` converted to fp32 at a time (bounds the extra memory for bf16/fp16).
ROW_CHUNK = 4096


def fill_score(quality: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [..., N] in [-1, 0): the order of the fill once no gain is left.

    Increasing in quality, so the fill takes the most relevant remaining tokens first
    (ties to the lowest index, as `argmax` returns the first maximum).
    """
    return -1.0 / (1.0 + quality)


def sumsq(features: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N] fp32: f_i . f_i, in row chunks (no full fp32 copy of bf16/fp16)."""
    if not features.shape[0]:
        return features.new_zeros(0, dtype=torch.float32)
    chunks = (features[s : s + ROW_CHUNK].float() for s in range(0, features.shape[0], ROW_CHUNK))
    return torch.cat([(c * c).sum(-1) for c in chunks])  # x * x: pow's values, 3x its speed


def select(score: torch.Tensor, eps: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """[..., N] scores -> [..., N] bool: the tie window of the greedy choice.

    With a positive best gain `m > eps` the window is `score >= m - tie`; in the fill phase
    (`m` is a fill score) it is `score == m`. The pick is the window's lowest index.
    """
    m = score.amax(dim=-1, keepdim=True)
    thr = torch.where(m > eps, m - tie, m)
    return score >= thr


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """[..., N] bool -> [...] int64: index of the first True (argmax returns the first max)."""
    return mask.to(torch.uint8).argmax(dim=-1)


def token_scale(sq: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """[N] f.f, [N] q -> [N] fp32: w_i = q_i / max(||f_i||, 1e-12); L_ij = (f_i.f_j) w_i w_j."""
    return quality.float() / sq.sqrt().clamp_min(1e-12)


def _dots(features: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
    """features[rows] @ features[cols].T in fp32 without a full fp32 copy of `features`.

    `rows=None` means all rows, processed in contiguous chunks of `ROW_CHUNK`.
    """
    f_cols = features[cols].float()
    if rows is not None:
        return features[rows].float() @ f_cols.T
    n = features.shape[0]
    out = torch.empty(n, f_cols.shape[0], dtype=torch.float32, device=features.device)
    for start in range(0, n, ROW_CHUNK):
        torch.mm(
            features[start : start + ROW_CHUNK].float(),
            f_cols.T,
            out=out[start : start + ROW_CHUNK],
        )
    return out


# Without the compiled path, up to this many tokens per image the materialised loop (one
# N x N GEMM, then K steps over rows of L) is the faster PyTorch path; above it the lazy
# queue, whose memory stays O(N (K + D)) (bench_kernels.py rows torch-loop / torch-lazy).
# Same picks either way (same arithmetic and tie rule).
MATERIALISE_MAX_N = 2048


def _greedy_one(
    features: torch.Tensor, quality: torch.Tensor, eligible: torch.Tensor, k: int
) -> torch.Tensor:
    """One image: [N, D], [N] fp32 >= 0, [N] bool, k -> LongTensor [k] (greedy order).

    Lazy greedy (log det is submodular: gains only shrink, so stale gains are upper
    bounds). Picks `t0..t-1` are pending: only tokens that reach the top of the queue
    get their rows for them (one small GEMM + triangular solve); every `COMMIT_BLOCK`
    picks the pending rows are applied to all live tokens with one GEMM. A token is
    picked when it is at the top of the queue (largest score, ties to the lowest index)
    *and* up to date, which is exactly the full greedy's choice. Memory O(N * (k + D)).
    """
    n = features.shape[0]
    device = features.device
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    sq = sumsq(features)
    w = token_scale(sq, quality)
    diag = (sq * w) * w  # L_ii
    dmax = diag.max().clamp_min(1e-30)
    eps, tie = dmax * GAIN_EPS, dmax * TIE_RTOL
    fill = fill_score(quality.float())

    gains = diag.clone()  # exact for up-to-date tokens, an upper bound for stale ones
    base = diag.clone()  # gains after the committed rows [0, t0)
    avail = eligible.clone()
    f32 = torch.float32  # explicit: vLLM builds models under their dtype as the default
    chol = torch.zeros(k, n, dtype=f32, device=device)  # committed Cholesky rows (live tokens)
    pend = torch.zeros(COMMIT_BLOCK, n, dtype=f32, device=device)  # pending rows [t0, t)
    tri = torch.eye(COMMIT_BLOCK, dtype=f32, device=device)  # pending picks' factor (lower)
    fresh = torch.zeros(n, dtype=torch.bool, device=device)
    picks = torch.empty(k, dtype=torch.long, device=device)
    t0 = 0

    def rows_for(cols: torch.Tensor | None, t: int) -> torch.Tensor:
        """Pending Cholesky rows [t0, t) for tokens `cols` (None: all) -> [t - t0, |cols|]."""
        p_idx = picks[t0:t]
        p = t - t0
        if cols is None:
            g = _dots(features, None, p_idx).T  # [p, N]
            w_c, c_cols = w, chol[:t0]
        else:
            g = _dots(features, p_idx, cols)  # [p, m]
            w_c, c_cols = w[cols], chol[:t0, cols]
        g = (g * w_c) * w[p_idx].unsqueeze(1)
        if t0 > 0:
            g = g - chol[:t0, p_idx].T @ c_cols
        return torch.linalg.solve_triangular(tri[:p, :p], g, upper=False)

    with selection_threads(device):
        for t in range(k):
            p = t - t0
            while True:
                score = torch.where(gains > eps, gains, fill).masked_fill_(~avail, float("-inf"))
                window = select(score, eps, tie)
                # stale gains are upper bounds: the window is exact once none of it is stale
                stale = window & ~fresh & (gains > eps)
                if p == 0 or not bool(stale.any()):
                    j = int(first_true(window))
                    break
                top = torch.topk(score, min(REFRESH, n)).indices
                top = top[(~fresh[top]) & (gains[top] > eps) & avail[top]]
                top = torch.unique(torch.cat([top, stale.nonzero().squeeze(1)]))
                x = rows_for(top, t)
                pend[:p, top] = x
                gains[top] = base[top] - x.square().sum(0)
                fresh[top] = True

            if not bool(gains[j] > eps):
                # No eligible token has a gain left, and gains never grow: fill the rest by
                # descending relevance, ties to the lowest index.
                order = torch.sort(score, descending=True, stable=True).indices
                picks[t:] = order[: k - t]
                break
            picks[t] = j
            avail[j] = False
            tri[p, :p] = pend[:p, j]
            tri[p, p] = gains[j].sqrt()
            fresh.zero_()
            if p + 1 == COMMIT_BLOCK and t + 1 < k:
                live = avail & (gains > eps)
                x = rows_for(None, t + 1)
                chol[t0 : t + 1] = torch.where(live, x, 0.0)
                gains = torch.where(live, base - x.square().sum(0), gains)
                base = gains.clone()
                tri = torch.eye(COMMIT_BLOCK, dtype=f32, device=device)
                t0 = t + 1
    return picks


def dpp_greedy_map_materialized(
    features: torch.Tensor,
    relevance: torch.Tensor | None,
    k: int,
    *,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The authors' way, as a baseline and a second oracle: same contract and arithmetic as
    `dpp_greedy_map`, but it materialises `L` (one N x N GEMM per image) and runs the K
    greedy steps one after the other over whole rows of `L`. O(N^2) memory: small N only.
    """
    bsz, n, _ = features.shape
    out = torch.empty(bsz, k, dtype=torch.long, device=features.device)
    for b in range(bsz):
        f = features[b].float()
        ones = torch.ones(n, dtype=torch.float32, device=f.device)
        q = ones if relevance is None else relevance[b].float()
        q = q.clamp_min(0)
        sq = sumsq(f)
        w = token_scale(sq, q)
        big_l = ((f @ f.T) * w) * w.unsqueeze(1)
        gains = (sq * w) * w
        dmax = gains.max().clamp_min(1e-30)
        eps, tie = dmax * GAIN_EPS, dmax * TIE_RTOL
        fill = fill_score(q)
        avail = (
            torch.ones(n, dtype=torch.bool, device=f.device)
            if candidates is None
            else candidates[b].clone()
        )
        chol = torch.zeros(k, n, dtype=torch.float32, device=f.device)
        for t in range(k):
            score = torch.where(gains > eps, gains, fill).masked_fill_(~avail, float("-inf"))
            j = int(first_true(select(score, eps, tie)))
            out[b, t] = j
            avail[j] = False
            if bool(gains[j] > eps):
                e = (big_l[j] - chol[:t, j] @ chol[:t]) / gains[j].sqrt()
                chol[t] = e
                gains = gains - e.square()
    return out


def dpp_greedy_map(
    features: torch.Tensor,
    relevance: torch.Tensor | None,
    k: int,
    *,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, N, D], [B, N] | None, k -> LongTensor [B, k] in greedy selection order.

    Kernel `L = diag(q) S diag(q)` with `S` the cosine similarity of the rows of
    `features` (fp32 accumulation) and `q = relevance` (all ones if None). Each step
    picks the eligible, unselected token with the largest gain `d_i^2 =
    det(L_{Y+i}) / det(L_Y)`, ties (within `TIE_RTOL * max L_ii`) to the lowest index.
    Fill rule: once no eligible token has a gain above `GAIN_EPS * max L_ii` (duplicates,
    rank deficiency, D < k), the remaining picks are the eligible unselected tokens by
    descending relevance, ties to the lowest index; no NaN can appear.

    Inputs are assumed validated (see `vllm_script.ops.dpp_greedy_map`). CPU tensors run
    the compiled lazy greedy (`vllm_script.reference.dpp_cpu`, when numba is available);
    otherwise up to `MATERIALISE_MAX_N` tokens `dpp_greedy_map_materialized`, above it the
    lazy blocked queue (`dpp_greedy_map_lazy`). All three make the same choices.
    """
    if features.device.type == "cpu" and dpp_cpu.available():
        return _per_image(dpp_cpu.greedy_one, features, relevance, k, candidates)
    if features.shape[1] <= MATERIALISE_MAX_N:
        return dpp_greedy_map_materialized(features, relevance, k, candidates=candidates)
    return dpp_greedy_map_lazy(features, relevance, k, candidates=candidates)


def _per_image(greedy, features, relevance, k, candidates, **extra) -> torch.Tensor:
    """Run `greedy(features [N, D], quality [N], eligible [N], k, **extra)` on each image
    (an `extra` value is [B, ...]: image b gets its row b)."""
    bsz, n, _ = features.shape
    out = torch.empty(bsz, k, dtype=torch.long, device=features.device)
    for b in range(bsz):
        quality = (
            torch.ones(n, dtype=torch.float32, device=features.device)
            if relevance is None
            else relevance[b].float().clamp_min(0)
        )
        eligible = (
            torch.ones(n, dtype=torch.bool, device=features.device)
            if candidates is None
            else candidates[b]
        )
        out[b] = greedy(
            features[b], quality, eligible, k, **{key: v[b] for key, v in extra.items()}
        )
    return out


def dpp_greedy_map_lazy(
    features: torch.Tensor,
    relevance: torch.Tensor | None,
    k: int,
    *,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """`dpp_greedy_map` by the lazy blocked queue in PyTorch at any N (O(N (K + D)) memory)."""
    return _per_image(_greedy_one, features, relevance, k, candidates)


def dpp_greedy_map_compiled(
    features: torch.Tensor,
    relevance: torch.Tensor | None,
    k: int,
    *,
    candidates: torch.Tensor | None = None,
    cross_dots: torch.Tensor | None = None,
) -> torch.Tensor:
    """`dpp_greedy_map` by the numba-compiled lazy greedy (CPU tensors; needs numba).

    `cross_dots`: fp32 [B, ceil(N/2), N/2], the even x odd dots of each image, read instead
    of recomputed (see `dpp_cpu.greedy_one`).
    """
    if not dpp_cpu.available():
        raise RuntimeError("the compiled CPU path needs numba (and VLLM_SCRIPT_NUMBA != 0)")
    extra = {} if cross_dots is None else {"cross_dots": cross_dots}
    return _per_image(dpp_cpu.greedy_one, features.cpu(), relevance, k, candidates, **extra)


def dpp_greedy_map_varlen(
    features: torch.Tensor,
    cu_seqlens: torch.Tensor,
    relevance: torch.Tensor | None,
    k: list[int],
    *,
    candidates: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """[T, D], LongTensor [B+1], [T] | None, k per image -> list of LongTensor [k_b].

    Image b owns rows `cu_seqlens[b]:cu_seqlens[b+1]`; its picks are local indices in
    greedy order, with the same rule as `dpp_greedy_map`. Inputs assumed validated.
    """
    bounds = cu_seqlens.tolist()
    compiled = features.device.type == "cpu" and dpp_cpu.available()
    greedy = dpp_cpu.greedy_one if compiled else _greedy_one
    out = []
    for b, k_b in enumerate(k):
        lo, hi = bounds[b], bounds[b + 1]
        quality = (
            torch.ones(hi - lo, dtype=torch.float32, device=features.device)
            if relevance is None
            else relevance[lo:hi].float().clamp_min(0)
        )
        eligible = (
            torch.ones(hi - lo, dtype=torch.bool, device=features.device)
            if candidates is None
            else candidates[lo:hi]
        )
        out.append(greedy(features[lo:hi], quality, eligible, k_b))
    return out
