"""Triton kernels: exact fast greedy DPP MAP inference, batched and varlen.

Twin (oracle and CPU path): `vllm_script.reference.dpp`, same signatures, same
arithmetic (see its module docstring): `w_i = q_i / max(||f_i||, 1e-12)`,
`L_ij = ((f_i . f_j) * w_i) * w_j`, `e_i = (L_ji - sum_s C[s,j] C[s,i]) / sqrt(gain_j)`,
`gain_i -= e_i^2`, gains at or below `GAIN_EPS * max L_ii` count as zero (fill rule).

Plan (one launch per greedy step; the K steps are sequential, so launch latency is the
floor on a GPU and a CUDA graph of the step launches is the way to lower it):
  1. `_dpp_prep_kernel`  per token: f.f, w, L_ii (= the initial gain); per tile max L_ii.
  2. `_dpp_gram_kernel`  (materialised path only) raw dots F F^T per image, tl.dot with
     fp32 accumulation (IEEE fp32 for fp32 inputs, no TF32; see `dot_mode`).
  3. `_dpp_init_kernel`  eps and tie window per image, per-tile best score.
  4. `_dpp_step_kernel`  x K: every program reduces the per-tile bests to the best score,
     finds the pick j (the lowest index within the tie window `TIE_RTOL * max L_ii` of the
     best, scanning only tiles whose best reaches the window), forms its tile of row
     L[j, :] (from the Gram matrix, or on the fly as F_tile @ f_j), subtracts
     C[:t, j]^T C[:t, tile], writes C[t, tile], updates its gains (double-buffered, so all
     programs of a step see the same scores) and publishes its tile's best score.
Rows on the fly cost K*N*D FLOPs and O(N*(K+D)) memory (long videos); the Gram matrix
costs N^2*D FLOPs in one GEMM and N^2 fp32 (chosen while it stays small, see
`MATERIALIZE_MAX_BYTES`). The kernels return indices only; they never gather features.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vllm_script.reference.dpp import GAIN_EPS, TIE_RTOL

# Materialise the per-image Gram matrices while they take at most this much memory.
MATERIALIZE_MAX_BYTES = 256 * 2**20

# jitted code may only read constexpr globals
_GAIN_EPS = tl.constexpr(GAIN_EPS)
_TIE_RTOL = tl.constexpr(TIE_RTOL)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_mode(dtype: torch.dtype, device: torch.device) -> int:
    """How `_tile_dot` multiplies tiles: 0 tl.dot (bf16/fp16 tensor cores, fp32 accumulation),
    1 tl.dot in IEEE fp32 (fp32 inputs: no TF32), 2 broadcast-multiply-sum in fp32.

    Mode 2 is for the interpreter: its tl.dot is numpy's GEMM, whose rounding depends on an
    element's position in the tile (so exact duplicate tokens stop tying), and its bf16 dot
    is broken in triton 3.8. bf16/fp16 products are exact in fp32, so the modes agree up to
    the order of the fp32 sums.
    """
    if _interpreting() or device.type != "cuda":
        return 2
    return 1 if dtype == torch.float32 else 0


@triton.jit
def _tile_dot(b_a, b_bt, b_acc, DOT_MODE: tl.constexpr):
    """b_acc + b_a [M, K] @ b_bt [K, N], fp32 accumulation (see `dot_mode`)."""
    if DOT_MODE == 2:
        b_prod = b_a.to(tl.float32)[:, :, None] * b_bt.to(tl.float32)[None, :, :]
        b_acc += tl.sum(b_prod, axis=1)
    elif DOT_MODE == 1:
        b_acc = tl.dot(b_a, b_bt, b_acc, input_precision="ieee")
    else:
        b_acc = tl.dot(b_a, b_bt, b_acc)
    return b_acc


@triton.jit
def _dpp_prep_kernel(
    f_ptr,
    q_ptr,
    cand_ptr,
    cu_ptr,
    w_ptr,
    gain_ptr,
    avail_ptr,
    pmax_ptr,
    D,
    NT,
    HAS_Q: tl.constexpr,
    HAS_CAND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    bos = tl.load(cu_ptr + i_b)
    n = tl.load(cu_ptr + i_b + 1) - bos
    o_n = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n
    b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        p_f = f_ptr + (bos + o_n)[:, None].to(tl.int64) * D + o_d[None, :]
        b_f = tl.load(p_f, mask=m_n[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
        b_sq += tl.sum(b_f * b_f, axis=1)
    if HAS_Q:
        b_q = tl.maximum(tl.load(q_ptr + bos + o_n, mask=m_n, other=0.0).to(tl.float32), 0.0)
    else:
        b_q = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    b_w = tl.div_rn(b_q, tl.maximum(tl.sqrt_rn(b_sq), 1e-12))
    b_diag = (b_sq * b_w) * b_w
    if HAS_CAND:
        b_av = tl.load(cand_ptr + bos + o_n, mask=m_n, other=0).to(tl.int8)
    else:
        b_av = tl.full([BLOCK_N], 1, dtype=tl.int8)
    tl.store(w_ptr + bos + o_n, b_w, mask=m_n)
    tl.store(gain_ptr + bos + o_n, b_diag, mask=m_n)
    tl.store(avail_ptr + bos + o_n, b_av, mask=m_n)
    tl.store(pmax_ptr + i_b * NT + i_t, tl.max(tl.where(m_n, b_diag, 0.0), axis=0))


@triton.jit
def _dpp_gram_kernel(
    f_ptr,
    cu_ptr,
    soff_ptr,
    s_ptr,
    D,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_m, i_n, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_ptr + i_b)
    n = tl.load(cu_ptr + i_b + 1) - bos
    if (i_m * BLOCK_M >= n) | (i_n * BLOCK_N >= n):
        return
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = o_m < n, o_n < n
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        p_a = f_ptr + (bos + o_m)[:, None].to(tl.int64) * D + o_d[None, :]
        p_b = f_ptr + (bos + o_n)[None, :].to(tl.int64) * D + o_d[:, None]
        b_a = tl.load(p_a, mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_bt = tl.load(p_b, mask=m_d[:, None] & m_n[None, :], other=0.0)
        b_acc = _tile_dot(b_a, b_bt, b_acc, DOT_MODE)
    p_s = s_ptr + tl.load(soff_ptr + i_b) + o_m[:, None].to(tl.int64) * n + o_n[None, :]
    tl.store(p_s, b_acc, mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _dpp_score(b_g, b_q, b_av, m_n, eps):
    b_fill = tl.div_rn(tl.full(b_q.shape, -1.0, tl.float32), 1.0 + b_q)
    b_s = tl.where(b_g > eps, b_g, b_fill)
    return tl.where(m_n & (b_av != 0), b_s, float("-inf"))


@triton.jit
def _dpp_load_q(q_ptr, o, m, HAS_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    if HAS_Q:
        b_q = tl.maximum(tl.load(q_ptr + o, mask=m, other=0.0).to(tl.float32), 0.0)
    else:
        b_q = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    return b_q


@triton.jit
def _dpp_init_kernel(
    q_ptr,
    cu_ptr,
    gain_ptr,
    avail_ptr,
    pmax_ptr,
    eps_ptr,
    tie_ptr,
    pval_ptr,
    NT,
    HAS_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_NT: tl.constexpr,
):
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    bos = tl.load(cu_ptr + i_b)
    n = tl.load(cu_ptr + i_b + 1) - bos
    o_nt = tl.arange(0, BLOCK_NT)
    b_pmax = tl.load(pmax_ptr + i_b * NT + o_nt, mask=o_nt < NT, other=0.0)
    dmax = tl.maximum(tl.max(b_pmax, axis=0), 1e-30)
    eps = dmax * _GAIN_EPS
    if i_t == 0:
        tl.store(eps_ptr + i_b, eps)
        tl.store(tie_ptr + i_b, dmax * _TIE_RTOL)
    o_n = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n
    b_g = tl.load(gain_ptr + bos + o_n, mask=m_n, other=0.0)
    b_q = _dpp_load_q(q_ptr, bos + o_n, m_n, HAS_Q, BLOCK_N)
    b_av = tl.load(avail_ptr + bos + o_n, mask=m_n, other=0)
    tl.store(pval_ptr + i_b * NT + i_t, tl.max(_dpp_score(b_g, b_q, b_av, m_n, eps), axis=0))


@triton.jit(do_not_specialize=["t"])
def _dpp_step_kernel(
    f_ptr,
    q_ptr,
    cu_ptr,
    k_ptr,
    w_ptr,
    gain_ptr,
    avail_ptr,
    eps_ptr,
    tie_ptr,
    soff_ptr,
    s_ptr,
    coff_ptr,
    c_ptr,
    pval_ptr,
    picks_ptr,
    t,
    B,
    T,
    D,
    NT,
    MAX_K,
    HAS_Q: tl.constexpr,
    MATERIALIZED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_NT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    k = tl.load(k_ptr + i_b)
    bos = tl.load(cu_ptr + i_b)
    n = tl.load(cu_ptr + i_b + 1) - bos
    if (t >= k) | (i_t * BLOCK_N >= n):
        return
    nt = tl.cdiv(n, BLOCK_N)
    # state of step t (gains, avail) is read from buffer t % 2 and written to the other,
    # so every program sees the same scores while the picks' owners update theirs
    g_in = gain_ptr + (t % 2) * T + bos
    a_in = avail_ptr + (t % 2) * T + bos
    g_out = gain_ptr + ((t + 1) % 2) * T + bos
    a_out = avail_ptr + ((t + 1) % 2) * T + bos
    p_in = pval_ptr + (t % 2) * B * NT + i_b * NT
    o_nt = tl.arange(0, BLOCK_NT)
    best = tl.max(tl.load(p_in + o_nt, mask=o_nt < nt, other=float("-inf")), axis=0)
    eps = tl.load(eps_ptr + i_b)
    thr = tl.where(best > eps, best - tl.load(tie_ptr + i_b), best)
    # the pick: the lowest index whose score is within the tie window of the best
    j = i_t * 0 + 2147483647
    for it in range(0, nt):
        if tl.load(p_in + it) >= thr:
            o_s = it * BLOCK_N + tl.arange(0, BLOCK_N)
            m_s = o_s < n
            b_sg = tl.load(g_in + o_s, mask=m_s, other=0.0)
            b_sq = _dpp_load_q(q_ptr, bos + o_s, m_s, HAS_Q, BLOCK_N)
            b_sa = tl.load(a_in + o_s, mask=m_s, other=0)
            b_ss = _dpp_score(b_sg, b_sq, b_sa, m_s, eps)
            j = tl.minimum(j, tl.min(tl.where(b_ss >= thr, o_s, 2147483647), axis=0))
    if i_t == 0:
        tl.store(picks_ptr + i_b * MAX_K + t, j.to(tl.int64))
    gain_j = tl.load(g_in + j)

    o_n = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n
    b_g = tl.load(g_in + o_n, mask=m_n, other=0.0)
    if gain_j > eps:
        # tile of row L[j, :]
        if MATERIALIZED:
            p_s = s_ptr + tl.load(soff_ptr + i_b) + j.to(tl.int64) * n + o_n
            b_dot = tl.load(p_s, mask=m_n, other=0.0)
        else:
            b_dot = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                m_d = o_d < D
                p_f = f_ptr + (bos + o_n)[:, None].to(tl.int64) * D + o_d[None, :]
                b_f = tl.load(p_f, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
                p_fj = f_ptr + (bos + j).to(tl.int64) * D + o_d
                b_fj = tl.load(p_fj, mask=m_d, other=0.0).to(tl.float32)
                b_dot += tl.sum(b_f * b_fj[None, :], axis=1)
        b_w = tl.load(w_ptr + bos + o_n, mask=m_n, other=0.0)
        w_j = tl.load(w_ptr + bos + j)
        b_l = (b_dot * b_w) * w_j
        # minus C[:t, j]^T C[:t, tile]
        c_base = c_ptr + tl.load(coff_ptr + i_b)
        b_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s0 in range(0, t, BLOCK_T):
            o_r = s0 + tl.arange(0, BLOCK_T)
            m_r = o_r < t
            b_cj = tl.load(c_base + o_r.to(tl.int64) * n + j, mask=m_r, other=0.0)
            p_c = c_base + o_r[:, None].to(tl.int64) * n + o_n[None, :]
            b_c = tl.load(p_c, mask=m_r[:, None] & m_n[None, :], other=0.0)
            b_acc += tl.sum(b_cj[:, None] * b_c, axis=0)
        b_e = tl.div_rn(b_l - b_acc, tl.sqrt_rn(gain_j))
        tl.store(c_base + t * n + o_n, b_e, mask=m_n)
        b_g = b_g - b_e * b_e
    b_av = tl.load(a_in + o_n, mask=m_n, other=0)
    b_av = tl.where(o_n == j, 0, b_av).to(tl.int8)
    tl.store(g_out + o_n, b_g, mask=m_n)
    tl.store(a_out + o_n, b_av, mask=m_n)
    # this tile's best score for step t + 1
    b_q = _dpp_load_q(q_ptr, bos + o_n, m_n, HAS_Q, BLOCK_N)
    b_s = _dpp_score(b_g, b_q, b_av, m_n, eps)
    tl.store(pval_ptr + ((t + 1) % 2) * B * NT + i_b * NT + i_t, tl.max(b_s, axis=0))


def _blocks(max_n: int, d: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_T, BLOCK_D, Gram BLOCK_M = BLOCK_N, Gram BLOCK_D).

    Wide tiles for the interpreter (numpy is fast on big blocks, slow per program),
    narrow ones on a GPU (more programs per step). Tests patch this to force many tiles.
    """
    if _interpreting() or device.type != "cuda":
        blk_n = min(1024, triton.next_power_of_2(max(max_n, 16)))
        blk_d = min(256, triton.next_power_of_2(max(d, 16)))
        return blk_n, 256, blk_d, min(128, blk_n), 16
    return 128, 32, 128, 64, 32


def use_gram(lengths: list[int], ks: list[int], device: torch.device) -> bool:
    """Materialise the Gram matrices (one GEMM, N^2 fp32 each) or form rows on the fly.

    GPU: the GEMM costs N^2*D FLOPs on tensor cores (~0.1 ms at N = 2880, D = 4096 in
    bf16) against K*N*D re-read from memory one row per step (memory-bound, ~3 ms there):
    materialise while the matrices fit in `MATERIALIZE_MAX_BYTES` (N = 16k video: 1 GiB,
    so no). Interpreter (CPU): both are numpy without BLAS (see `dot_mode`), so count
    FLOPs: rows (K*N*D) unless K > N/4 (the Gram's N^2*D, in bigger tiles, is then cheaper).
    """
    if device.type != "cuda" or _interpreting():
        return 4 * max(ks, default=0) > max(lengths, default=0)
    return sum(n * n for n in lengths) * 4 <= MATERIALIZE_MAX_BYTES


def dpp_greedy_map_varlen(
    features: torch.Tensor,
    cu_seqlens: torch.Tensor,
    relevance: torch.Tensor | None,
    k: list[int],
    *,
    candidates: torch.Tensor | None = None,
    materialize: bool | None = None,
) -> list[torch.Tensor]:
    """Triton twin of `vllm_script.reference.dpp.dpp_greedy_map_varlen` (same contract).

    `materialize`: None picks by size (`use_gram`); True/False forces a path.
    Inputs assumed validated (see `vllm_script.ops`).
    """
    device = features.device
    total, d = features.shape
    bsz = cu_seqlens.numel() - 1
    bounds = cu_seqlens.tolist()
    lengths = [bounds[b + 1] - bounds[b] for b in range(bsz)]
    max_n = max(lengths) if lengths else 0
    max_k = max(k) if k else 0
    if bsz == 0 or max_k == 0:
        return [torch.empty(k_b, dtype=torch.long, device=device) for k_b in k]
    features = features.contiguous()
    if features.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        features = features.float()
    block_n, block_t, block_d, gram_m, gram_d = _blocks(max_n, d, device)
    nt = triton.cdiv(max_n, block_n)
    block_nt = triton.next_power_of_2(nt)
    cu = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()
    kk = torch.tensor(k, dtype=torch.int64, device=device)
    rel = None if relevance is None else relevance.contiguous()
    cand = None if candidates is None else candidates.contiguous()

    w = torch.empty(total, dtype=torch.float32, device=device)
    gains = torch.empty(2, total, dtype=torch.float32, device=device)  # double-buffered
    avail = torch.empty(2, total, dtype=torch.int8, device=device)
    pmax = torch.zeros(bsz, nt, dtype=torch.float32, device=device)
    eps = torch.empty(bsz, dtype=torch.float32, device=device)
    tie = torch.empty(bsz, dtype=torch.float32, device=device)
    pval = torch.full((2, bsz, nt), float("-inf"), dtype=torch.float32, device=device)
    picks = torch.full((bsz, max_k), -1, dtype=torch.int64, device=device)
    c_sizes = [k_b * n_b for k_b, n_b in zip(k, lengths, strict=True)]
    coff = torch.tensor([0] + c_sizes[:-1], device=device).cumsum(0)
    chol = torch.zeros(max(sum(c_sizes), 1), dtype=torch.float32, device=device)
    dummy = w  # stands in for absent optional pointers (never read)

    grid = (nt, bsz)
    _dpp_prep_kernel[grid](
        features, dummy if rel is None else rel, dummy if cand is None else cand, cu,
        w, gains, avail, pmax, d, nt,
        HAS_Q=rel is not None, HAS_CAND=cand is not None, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip

    gram = use_gram(lengths, k, device) if materialize is None else bool(materialize)
    if gram:
        s_sizes = [n_b * n_b for n_b in lengths]
        soff = torch.tensor([0] + s_sizes[:-1], device=device).cumsum(0)
        sim = torch.empty(max(sum(s_sizes), 1), dtype=torch.float32, device=device)
        ggrid = (triton.cdiv(max_n, gram_m), triton.cdiv(max_n, gram_m), bsz)
        _dpp_gram_kernel[ggrid](
            features, cu, soff, sim, d,
            DOT_MODE=dot_mode(features.dtype, device), BLOCK_M=gram_m, BLOCK_N=gram_m,
            BLOCK_D=gram_d,
        )  # fmt: skip
    else:
        soff, sim = cu, dummy

    _dpp_init_kernel[grid](
        dummy if rel is None else rel, cu, gains, avail, pmax, eps, tie, pval, nt,
        HAS_Q=rel is not None, BLOCK_N=block_n, BLOCK_NT=block_nt,
    )  # fmt: skip
    for t in range(max_k):
        _dpp_step_kernel[grid](
            features, dummy if rel is None else rel, cu, kk, w, gains, avail, eps, tie,
            soff, sim, coff, chol, pval, picks, t, bsz, total, d, nt, max_k,
            HAS_Q=rel is not None, MATERIALIZED=gram, BLOCK_N=block_n, BLOCK_NT=block_nt,
            BLOCK_T=block_t, BLOCK_D=block_d,
        )  # fmt: skip
    return [picks[b, : k[b]] for b in range(bsz)]


def dpp_greedy_map(
    features: torch.Tensor,
    relevance: torch.Tensor | None,
    k: int,
    *,
    candidates: torch.Tensor | None = None,
    materialize: bool | None = None,
) -> torch.Tensor:
    """Triton twin of `vllm_script.reference.dpp.dpp_greedy_map`: [B, N, D] -> [B, k]."""
    bsz, n, d = features.shape
    cu = torch.arange(0, (bsz + 1) * n, n, dtype=torch.int64, device=features.device)
    out = dpp_greedy_map_varlen(
        features.reshape(bsz * n, d),
        cu,
        None if relevance is None else relevance.reshape(bsz * n),
        [k] * bsz,
        candidates=None if candidates is None else candidates.reshape(bsz * n),
        materialize=materialize,
    )
    if bsz == 0:
        return torch.empty(0, k, dtype=torch.long, device=features.device)
    return torch.stack(out)
