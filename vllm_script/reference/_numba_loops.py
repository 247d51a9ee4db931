"""numba-compiled loops of the CPU paths: the lazy greedy DPP (see
`vllm_script.reference.dpp_cpu`) and the per-row pass of GSP's bipartite statistics (see
`vllm_script.reference.bipartite`). Imported only when a CPU path first runs (importing
numba costs ~0.5 s).

The DPP's refreshes can run on numba's threads (`lazy_greedy_threads`). numba's
threading layer is process-wide: here OpenMP (GNU's; TBB is not installed). GNU OpenMP is
not fork-safe, and vLLM forks its engine: a process forked from one that already ran the
parallel refresh runs it serially instead (numba would abort it). So does a process whose
layer is "workqueue", whose launch costs more than the refresh saves.
"""

from __future__ import annotations

import os

import numba
import numpy as np

# stale tokens refreshed together, in parallel, before the heap is looked at again. Where
# few tokens crowd the top a one-by-one pass would leave most of them stale, so a batch
# costs refreshes a serial pass skips (never a different pick: a refresh only makes a
# bound exact); where many crowd it (LLaVA-NeXT features) they all get refreshed anyway.
# Serially: one at a time.
REFRESH_BATCH = 32
# at most this many threads share one batch: fewer than 4 tokens each would cost more in
# scheduling than they save (a guess: measured on 2 cores only)
REFRESH_MAX_THREADS = 8
_parallel_pid: list[int] = []  # the process that first ran the parallel refresh


# reassociation lets LLVM vectorise the sum (13x faster than the sequential loop here);
# the order is fixed for a given build and CPU, like a BLAS dot's
@numba.njit(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
def _dot(a, b):
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@numba.njit(cache=True, nogil=True)
def _push(keys, idxs, size, key, idx):
    """Max-heap on `keys` (parallel `idxs`); returns the new size."""
    c = size
    keys[c] = key
    idxs[c] = idx
    while c > 0:
        p = (c - 1) // 2
        if keys[p] >= keys[c]:
            break
        keys[p], keys[c] = keys[c], keys[p]
        idxs[p], idxs[c] = idxs[c], idxs[p]
        c = p
    return size + 1


@numba.njit(cache=True, nogil=True)
def _pop(keys, idxs, size):
    """Remove the top of the heap; returns (idx, new size)."""
    top = idxs[0]
    size -= 1
    keys[0] = keys[size]
    idxs[0] = idxs[size]
    c = 0
    while True:
        left = 2 * c + 1
        if left >= size:
            break
        m = left
        if left + 1 < size and keys[left + 1] > keys[left]:
            m = left + 1
        if keys[c] >= keys[m]:
            break
        keys[m], keys[c] = keys[c], keys[m]
        idxs[m], idxs[c] = idxs[c], idxs[m]
        c = m
    return top, size


@numba.njit(cache=True, nogil=True)
def _refresh_token(i, feats, w, chol, root, picks, gains, seen, t, cross):
    """Bring token i's Cholesky column and gain up to pick t - 1 (writes only its row).

    `cross` [ceil(N/2), N/2] (or 0 x 0: none) holds f_i . f_j for every even i and odd j,
    computed by GSP's GEMM: a pick of the other parity than i reads its dot there.
    """
    g = gains[i]
    shared = cross.shape[0] > 0
    if shared:
        # the shared dots first, parked in C[i, s] (written below anyway): these loads do
        # not depend on each other, so their cache misses overlap
        for s in range(seen[i], t):
            j = picks[s]
            if (i ^ j) & 1:
                chol[i, s] = cross[j >> 1, i >> 1] if i & 1 else cross[i >> 1, j >> 1]
    for s in range(seen[i], t):
        j = picks[s]
        acc = _dot(chol[j, :s], chol[i, :s])
        dot = chol[i, s] if shared and (i ^ j) & 1 else _dot(feats[j], feats[i])
        e = ((dot * w[i]) * w[j] - acc) / root[s]
        chol[i, s] = e
        g -= e * e
    gains[i] = g
    seen[i] = t


# two functions, not one compiled twice: numba's cache would hand one the other's code
@numba.njit(cache=True, nogil=True)
def _refresh_serial(tokens, feats, w, chol, root, picks, gains, seen, t, cross):
    for u in range(tokens.shape[0]):
        _refresh_token(tokens[u], feats, w, chol, root, picks, gains, seen, t, cross)


@numba.njit(cache=True, nogil=True, parallel=True)
def _refresh_parallel(tokens, feats, w, chol, root, picks, gains, seen, t, cross):
    for u in numba.prange(tokens.shape[0]):
        _refresh_token(tokens[u], feats, w, chol, root, picks, gains, seen, t, cross)


def lazy_greedy_threads(threads: int, *args) -> None:
    """`lazy_greedy(*args)` with its refreshes on `threads` of numba's threads (at most
    NUMBA_NUM_THREADS and REFRESH_MAX_THREADS; serially where the layer cannot, see the
    module docstring)."""
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS, REFRESH_MAX_THREADS))
    if _parallel_pid and (
        _parallel_pid[0] != os.getpid() or numba.threading_layer() == "workqueue"
    ):
        threads = 1
    if threads == 1:
        lazy_greedy(*args, _refresh_serial, 1)
        return
    _parallel_pid[:] = [os.getpid()]
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        lazy_greedy(*args, _refresh_parallel, REFRESH_BATCH)
    finally:
        numba.set_num_threads(before)


@numba.njit(cache=True, nogil=True)
def lazy_greedy(feats, w, diag, fill, avail, k, gain_eps, tie_rtol, picks, cross, refresh, batch):
    """One image: feats [N, D] fp32, w/diag/fill [N] fp32, avail [N] bool (modified),
    k, ..., cross (even x odd dots [ceil(N/2), N/2], or 0 x 0: none), refresh
    (`_refresh_serial` or `_refresh_parallel`: a separate compilation each, so the serial
    one never enters the threading layer), batch -> picks [k] int64 (written).

    A max-heap holds every eligible token keyed by its score (gain while above eps,
    else its fill score); a stale key is an upper bound of the token's score. Each
    step pops stale tokens and refreshes them (up to `batch` at once, with `refresh`)
    until the top is up to date (the best score), then pops the whole tie window
    (refreshing stale entries on the way) and picks its lowest index.
    """
    n = feats.shape[0]
    dmax = np.float32(1e-30)
    for i in range(n):
        if diag[i] > dmax:
            dmax = diag[i]
    eps = dmax * np.float32(gain_eps)
    tie = dmax * np.float32(tie_rtol)
    gains = diag.copy()
    seen = np.zeros(n, dtype=np.int64)  # picks applied to each token's column
    chol = np.zeros((n, k), dtype=np.float32)  # row i: token i's Cholesky column
    root = np.zeros(k, dtype=np.float32)  # sqrt(gain) of each pick at its step
    keys = np.empty(n, dtype=np.float32)
    idxs = np.empty(n, dtype=np.int64)
    window = np.empty(n, dtype=np.int64)
    stale = np.empty(batch, dtype=np.int64)
    size = 0
    for i in range(n):
        if avail[i]:
            size = _push(keys, idxs, size, gains[i] if gains[i] > eps else fill[i], i)
    for t in range(k):
        thr = np.float32(0.0)
        m = 0  # tokens in the tie window, popped
        found = False
        while size > 0:
            i = idxs[0]
            if gains[i] > eps and seen[i] < t:  # stale: bring up to date, push back
                m_stale = 0  # the stale run at the top of the heap, up to `batch`
                while size > 0 and m_stale < batch:
                    i = idxs[0]
                    if not (gains[i] > eps and seen[i] < t):
                        break
                    i, size = _pop(keys, idxs, size)
                    stale[m_stale] = i
                    m_stale += 1
                refresh(stale[:m_stale], feats, w, chol, root, picks, gains, seen, t, cross)
                for u in range(m_stale):
                    i = stale[u]
                    size = _push(keys, idxs, size, gains[i] if gains[i] > eps else fill[i], i)
                continue
            if not found:  # the top is exact: the best score of this step
                best = keys[0]
                if not best > eps:
                    break
                thr = best - tie
                found = True
            if keys[0] < thr:
                break
            i, size = _pop(keys, idxs, size)
            window[m] = i
            m += 1
        if not found:
            # no eligible gain left (gains only shrink): the rest by descending
            # relevance, ties to the lowest index (a stable sort of -fill)
            order = np.argsort(np.where(avail, -fill, np.inf), kind="mergesort")
            for s in range(k - t):
                picks[t + s] = order[s]
            return
        pick = window[0]
        for u in range(1, m):
            if window[u] < pick:
                pick = window[u]
        for u in range(m):
            i = window[u]
            if i != pick:
                size = _push(keys, idxs, size, gains[i], i)
        picks[t] = pick
        avail[pick] = False
        root[t] = np.sqrt(gains[pick])


# reassociation vectorises the row's sums (their order differs from a sequential sum, as a
# kernel's does); each S_ij is still two rounded products, never fused into the sums
@numba.njit(cache=True, fastmath={"reassoc"}, nogil=True)
def _row_sums(dots_row, r_i, inv_dst, tau, sims):
    deg = 0
    esum = np.float32(0.0)
    tsum = np.float32(0.0)
    for j in range(dots_row.shape[0]):
        s = (dots_row[j] * r_i) * inv_dst[j]
        sims[j] = s
        tsum += s
        edge = s >= tau
        deg += edge
        esum += s if edge else np.float32(0.0)
    return deg, esum, tsum


# "nnan": a NaN similarity (a NaN feature) makes the best unspecified, never its index
# out of range
@numba.njit(cache=True, fastmath={"reassoc", "nnan"}, nogil=True)
def _row_max(x):
    m = np.float32(-np.inf)
    for j in range(x.shape[0]):
        m = max(m, x[j])
    return m


@numba.njit(cache=True, nogil=True)
def bipartite_rows(dots, inv_src, inv_dst, tau, offset, degree, edge_sum, total_sum, best, arg):
    """One tile of dst columns: dots [M, T] fp32 (src . dst), inverse norms [M] / [T];
    folds S_ij = (dots_ij * r_i) * r_j into the per-src statistics [M] in place (degree
    over S >= tau, the sum of those edges, the sum of all, the best S and its first dst
    index, `offset` + column)."""
    sims = np.empty(dots.shape[1], dtype=np.float32)
    for i in range(dots.shape[0]):
        deg, esum, tsum = _row_sums(dots[i], inv_src[i], inv_dst, np.float32(tau), sims)
        degree[i] += deg
        edge_sum[i] += esum
        total_sum[i] += tsum
        m = _row_max(sims)
        if m > best[i]:  # strict: an earlier tile keeps a tie (the lowest dst index)
            best[i] = m
            for j in range(sims.shape[0]):
                if sims[j] == m:
                    arg[i] = offset + j
                    break
