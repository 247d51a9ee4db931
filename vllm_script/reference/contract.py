"""The numerics contract for selections computed in another summation order (GPU kernels).

A GPU sums the same fp32 products in another order than the CPU twin (tensor cores, tile
reductions, 3xTF32 for fp32 inputs), so results differ in their last bits and a greedy
step can flip a near-tie. What every backend guarantees instead of bitwise equality,
checked against float64 recomputations of the definitions (README, "Numerics contract"):

- Bipartite statistics (GSP): every cosine is within `cosine_tolerance(D, dtype)` of the
  exact one, so degrees count every edge above tau + tol and none below tau - tol, sums
  are within n_dst * tol, and the best dst is within 2 tol of the best.
- Greedy DPP: every pick is a valid greedy step when recomputed in float64 from the picks
  before it: its gain is within `GAIN_TOL * max L_ii` of the best eligible gain; once the
  best gain is below eps / 2 (eps = GAIN_EPS * max L_ii) it is the fill rule's choice
  (between eps / 2 and 2 eps either is valid); and the picks equal the twin's up to the
  first step where the twin's own float64 margin (its pick's gain minus the runner-up's)
  is below `NEAR_TIE_TOL * max L_ii`.
- DivPrune: every pick's float64 distance to its nearest pick is within
  `2 * cosine_tolerance` of the best.
"""

from __future__ import annotations

import torch

from vllm_script.reference.dpp import GAIN_EPS, TIE_RTOL, fill_score

UNIT_ROUNDOFF = 2.0**-24
# Relative to max L_ii. A pick's float64 gain may trail the best by GAIN_TOL (plus the tie
# window); the twin's picks trail by exactly 0 at N = 576..2880, D = 1024..4096, K <= 320
# (fp32 and bf16 inputs). Picks must equal the twin's while its margin is >= NEAR_TIE_TOL.
GAIN_TOL = 1e-4
NEAR_TIE_TOL = 1e-5


def cosine_tolerance(d: int, dtype: torch.dtype) -> float:
    """Bound on |computed - exact| cosine of two D-wide rows with fp32 accumulation.

    A dot of D products summed in fp32 in any order errs by at most ~D u ||a|| ||b||
    (u = 2^-24); each inverse norm by ~D u / 2; bf16/fp16 products are exact in fp32.
    fp32 inputs on tensor cores (3xTF32) add ~2^-21 per product, 2^-20 for the dot.
    """
    tol = (2 * d + 8) * UNIT_ROUNDOFF
    if dtype == torch.float32:
        tol += 2.0**-20
    return tol


def exact_cosines(features: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N] float64 cosine similarity of the rows (as stored: bf16 values exact),
    on the features' device."""
    f = features.double()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return f @ f.T


def bipartite_violations(
    features: torch.Tensor, tau: float, stats, image: int = 0, tol: float | None = None
) -> list[str]:
    """Where `stats` (a BipartiteStats of a [B, N, D] batch) breaks the contract for one image."""
    f = features[image]
    tol = cosine_tolerance(f.shape[-1], f.dtype) if tol is None else tol
    s = exact_cosines(f)[0::2, 1::2].cpu()  # src x dst
    n_dst = s.shape[1]
    if n_dst == 0:
        return []
    out = []
    sure = s >= tau + tol
    maybe = (s - tau).abs() < tol
    deg = stats.degree[image].cpu().double()
    lo, hi = sure.sum(1), (sure | maybe).sum(1)
    for i in torch.nonzero((deg < lo) | (deg > hi)).flatten().tolist():
        out.append(f"src {i}: degree {int(deg[i])} outside [{int(lo[i])}, {int(hi[i])}]")
    slack = n_dst * tol
    base = torch.where(sure, s, 0.0).sum(1)
    amb_lo = torch.where(maybe, s.clamp(max=0), 0.0).sum(1) - slack
    amb_hi = torch.where(maybe, s.clamp(min=0), 0.0).sum(1) + slack
    esum = stats.edge_sum[image].cpu().double() - base
    for i in torch.nonzero((esum < amb_lo) | (esum > amb_hi)).flatten().tolist():
        out.append(f"src {i}: edge sum off by {float(esum[i]):.3g} (slack {slack:.3g})")
    tsum_err = (stats.total_sum[image].cpu().double() - s.sum(1)).abs()
    for i in torch.nonzero(tsum_err > slack).flatten().tolist():
        out.append(f"src {i}: total sum off by {float(tsum_err[i]):.3g} (slack {slack:.3g})")
    best = s.max(1).values
    sim_err = (stats.best_sim[image].cpu().double() - best).abs()
    for i in torch.nonzero(sim_err > tol).flatten().tolist():
        out.append(f"src {i}: best cosine off by {float(sim_err[i]):.3g} (tol {tol:.3g})")
    at = s.gather(1, stats.best_dst[image].cpu().long().unsqueeze(1)).squeeze(1)
    for i in torch.nonzero(at < best - 2 * tol).flatten().tolist():
        gap = float(best[i] - at[i])
        out.append(f"src {i}: best dst {int(stats.best_dst[image, i])} is {gap:.3g} below the best")
    return out


def greedy_gains(
    features: torch.Tensor, quality: torch.Tensor | None, picks: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 gains [len(picks) + 1, N] before each pick (row t: given picks[:t]), and
    diag L [N], both on the CPU (computed on the features' device). A pick whose gain is at
    or below GAIN_EPS * max L_ii updates nothing, as in every backend (the fill phase)."""
    n, device = features.shape[0], features.device
    q = torch.ones(n, dtype=torch.float64, device=device)
    if quality is not None:
        q = quality.to(device).double().clamp_min(0)
    big_l = q[:, None] * exact_cosines(features) * q[None, :]
    gains = big_l.diagonal().clone()
    eps = GAIN_EPS * float(gains.max().clamp_min(1e-30))
    rows = torch.empty(len(picks) + 1, n, dtype=torch.float64, device=device)
    chol = torch.zeros(len(picks), n, dtype=torch.float64, device=device)
    used = 0
    for t, j in enumerate(picks):
        rows[t] = gains
        if gains[j] <= eps:
            continue
        e = (big_l[j] - chol[:used, j] @ chol[:used]) / gains[j].sqrt()
        chol[used] = e
        used += 1
        gains = (gains - e * e).clamp_min(0)
    rows[len(picks)] = gains
    return rows.cpu(), big_l.diagonal().cpu()


def greedy_violations(
    features: torch.Tensor,
    quality: torch.Tensor | None,
    picks: list[int],
    eligible: torch.Tensor | None = None,
    tol: float = GAIN_TOL,
) -> list[str]:
    """Steps of `picks` (one image: features [N, D], quality [N]) that are not a valid
    greedy DPP step in float64 within `tol * max L_ii` (see module docstring)."""
    n = features.shape[0]
    ok = torch.ones(n, dtype=torch.bool) if eligible is None else eligible.cpu().clone()
    gains, diag = greedy_gains(features, quality, picks)
    dmax = float(diag.max().clamp_min(1e-30))
    eps = GAIN_EPS * dmax
    q32 = torch.ones(n) if quality is None else quality.float().clamp_min(0).cpu()
    fill = fill_score(q32)
    out = []
    filling = False
    for t, j in enumerate(picks):
        if not (0 <= j < n) or not ok[j]:
            out.append(f"step {t}: pick {j} is not an eligible, unpicked token")
            break
        g = gains[t]
        best = float(g[ok].max())
        gain_ok = float(g[j]) >= best - (tol + TIE_RTOL) * dmax
        # the fill rule's choice: the most relevant remaining token, ties to the lowest index
        is_fill = j == int(torch.where(ok, fill, float("-inf")).argmax())
        if filling or best < eps / 2:
            filling = True
            if not is_fill:
                out.append(f"step {t}: pick {j} is not the fill rule's choice")
        elif best > 2 * eps:
            if not gain_ok:
                out.append(
                    f"step {t}: pick {j} has gain {float(g[j]) / dmax:.6g}, best "
                    f"{best / dmax:.6g} (x max L_ii), tolerance {tol:g}"
                )
        elif is_fill:  # the best gain is within a factor 2 of eps: either phase is valid
            filling = True
        elif not gain_ok:
            out.append(f"step {t}: pick {j} is neither a greedy step nor the fill choice")
        ok[j] = False
    return out


def first_near_tie(
    features: torch.Tensor,
    quality: torch.Tensor | None,
    picks: list[int],
    tol: float = NEAR_TIE_TOL,
) -> int:
    """The first step at which the float64 runner-up is within `tol * max L_ii` of the pick
    (len(picks) if none): up to there another summation order must pick the same tokens."""
    gains, diag = greedy_gains(features, quality, picks)
    dmax = float(diag.max().clamp_min(1e-30))
    done = torch.zeros(features.shape[0], dtype=torch.bool)
    for t, j in enumerate(picks):
        g = gains[t].masked_fill(done, float("-inf"))
        if float(g[j]) <= GAIN_EPS * dmax + tol * dmax:
            return t  # the fill phase begins: its threshold is itself a near tie
        runner_up = float(g.masked_fill(torch.arange(len(g)) == j, float("-inf")).max())
        if float(g[j]) - runner_up < tol * dmax:
            return t
        done[j] = True
    return len(picks)


def divprune_violations(
    features: torch.Tensor, order: list[int], tol: float | None = None
) -> list[str]:
    """Steps of a DivPrune pick order (one image) that are not a valid max-min step in
    float64 within 2 * tol (cosine tolerance by default)."""
    tol = cosine_tolerance(features.shape[-1], features.dtype) if tol is None else tol
    dist = 1.0 - exact_cosines(features).cpu()
    n = dist.shape[0]
    out = []
    picked = torch.zeros(n, dtype=torch.bool)
    nearest = (dist + torch.eye(n, dtype=torch.float64) * float("inf")).min(1).values
    score = nearest if n > 1 else torch.full((1,), float("inf"), dtype=torch.float64)
    for t, j in enumerate(order):
        if picked[j]:
            out.append(f"step {t}: {j} picked twice")
            break
        best = float(score.masked_fill(picked, float("-inf")).max())
        if float(score[j]) < best - 2 * tol:
            out.append(f"step {t}: pick {j} scores {float(score[j]):.6g}, best {best:.6g}")
        picked[j] = True
        score = dist[j] if t == 0 else torch.minimum(score, dist[j])
    return out
