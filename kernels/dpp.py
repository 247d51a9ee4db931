"""Triton kernels: exact fast greedy DPP MAP inference, batched and varlen.

Twin (oracle and CPU path): `vllm_script.reference.dpp`, same signatures, same
arithmetic (see its module docstring): `w_i = q_i / max(||f_i||, 1e-12)`,
`L_ij = ((f_i . f_j) * w_i) * w_j`, `e_i = (L_ji - sum_s C[s,j] C[s,i]) / sqrt(gain_j)`,
`gain_i -= e_i^2`, gains at or below `GAIN_EPS * max L_ii` count as zero (fill rule).

Plan (the K greedy steps are sequential, so on a GPU the cost per step is the floor):
  1. `_dpp_prep_kernel`  per token: f.f, q (clamped, fp32), w, L_ii (= the initial gain),
     eligibility; per tile max L_ii.
  2. `_dpp_gram_kernel`  (materialised path only) raw dots F F^T per image on tensor cores
     (bf16/fp16 products exact in fp32; fp32 inputs as 3xTF32, see `dot_mode`), upper
     triangle of tiles computed, mirrored.
  3. `_dpp_init_kernel`  eps and tie window per image, per-tile best score.
  4. `_dpp_step_kernel`  x K: every program reduces the per-tile bests to the best score,
     finds the pick j (the lowest index within the tie window `TIE_RTOL * max L_ii` of the
     best), forms its tile of row L[j, :] (from the Gram matrix, or on the fly as
     F_tile @ f_j), subtracts C[:t, j]^T C[:t, tile], writes C[t, tile], updates its gains
     (double-buffered, so all programs of a step see the same scores) and publishes its
     tile's best score. All images of a batch advance together: one launch per step.
The step kernel reads every per-call buffer address from a small int64 descriptor, so on
a GPU the K step launches of the materialised path are captured once per shape bucket in
a CUDA graph and replayed for any later call of that bucket (only the descriptor is
rewritten): no host launch per step (`launch.StepGraphs`). Rows on the fly cost K*N*D FLOPs and
O(N*(K+D)) memory (long videos); the Gram matrix costs N^2*D FLOPs in one GEMM and N^2
fp32 (used while a batch's matrices fit `gram_max_bytes()`, else the batch is split).
The kernels return indices only; they never gather features.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from vllm_script.kernels.launch import (
    STEP_BUCKET,
    StepGraphs,
    gpu_path,
    host_ints,
    launch,
    recording,
)

from vllm_script.reference.dpp import GAIN_EPS, TIE_RTOL

# Materialise a batch's Gram matrices while they take at most this much memory (MiB);
# larger batches are split into groups, and an image too large alone forms rows on the fly.
GRAM_MAX_MIB_ENV = "VLLM_SCRIPT_GRAM_MAX_MIB"
GRAM_MAX_MIB = 512
BLOCK_NT = 64  # per-tile bests reduced this many at a time

# jitted code may only read constexpr globals
_GAIN_EPS = tl.constexpr(GAIN_EPS)
_TIE_RTOL = tl.constexpr(TIE_RTOL)
_NO_PICK = tl.constexpr(2147483647)

# step descriptor: int64 slots (addresses, then integers)
(
    _D_Q, _D_CU, _D_K, _D_W, _D_GAIN, _D_AVAIL, _D_EPS, _D_TIE, _D_SOFF, _D_SIM, _D_COFF,
    _D_CHOL, _D_PVAL, _D_PICKS, _D_T, _D_MAXK, DESC_LEN,
) = range(17)  # fmt: skip


def gram_max_bytes() -> int:
    return int(float(os.environ.get(GRAM_MAX_MIB_ENV, GRAM_MAX_MIB)) * 2**20)


def dot_mode(dtype: torch.dtype, device: torch.device) -> int:
    """How `_tile_dot` multiplies tiles: 0 tl.dot (bf16/fp16 tensor cores, fp32
    accumulation), 1 tl.dot with 3xTF32 (fp32 inputs on tensor cores), 2 broadcast-multiply-
    sum in fp32.

    3xTF32 splits each fp32 value into two TF32 parts and keeps three of the four partial
    products: each product is within ~2^-21 of exact (IEEE fp32: 2^-24), at tensor-core
    speed instead of the CUDA-core FMA loop of `input_precision="ieee"` (measured on an
    H200: 8.6 ms for the 2880-token bipartite statistics in IEEE fp32, 7x the cuBLAS
    twin). Mode 2 is for the interpreter: its tl.dot is numpy's GEMM, whose rounding
    depends on an element's position in the tile (so exact duplicate tokens stop tying),
    and its bf16 dot is broken in triton 3.8. bf16/fp16 products are exact in fp32, so the
    modes agree up to the order of the fp32 sums (see the README's numerics contract).
    """
    if not gpu_path(device):
        return 2
    return 1 if dtype == torch.float32 else 0


@triton.jit
def _tile_dot(b_a, b_bt, b_acc, DOT_MODE: tl.constexpr):
    """b_acc + b_a [M, K] @ b_bt [K, N], fp32 accumulation (see `dot_mode`)."""
    if DOT_MODE == 2:
        b_prod = b_a.to(tl.float32)[:, :, None] * b_bt.to(tl.float32)[None, :, :]
        b_acc += tl.sum(b_prod, axis=1)
    elif DOT_MODE == 1:
        b_acc = tl.dot(b_a, b_bt, b_acc, input_precision="tf32x3")
    else:
        b_acc = tl.dot(b_a, b_bt, b_acc)
    return b_acc


@triton.jit
def _reduce_max(p_row, count, BLOCK: tl.constexpr):
    """max of `count` fp32 values at p_row (-inf when count == 0), BLOCK at a time."""
    best = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    for c0 in range(0, count, BLOCK):
        o = c0 + tl.arange(0, BLOCK)
        best = tl.maximum(best, tl.max(tl.load(p_row + o, mask=o < count, other=float("-inf"))))
    return best


@triton.jit
def _first_at_least(p_row, count, thr, BLOCK: tl.constexpr):
    """Lowest index i < count with p_row[i] >= thr (count when none), BLOCK at a time.

    One vector load per BLOCK values: a scalar load per tile in a loop is a chain of
    dependent loads, which set the step's latency at thousands of tokens."""
    first = count
    for c0 in range(0, count, BLOCK):
        o = c0 + tl.arange(0, BLOCK)
        m = o < count
        b_v = tl.load(p_row + o, mask=m, other=float("-inf"))
        first = tl.minimum(first, tl.min(tl.where(m & (b_v >= thr), o, count), axis=0))
    return first


@triton.jit
def _dpp_score(b_g, b_q, b_av, m_n, eps):
    """Greedy score: the gain while it is above eps, else the fill score -1 / (1 + q)."""
    b_fill = tl.div_rn(tl.full(b_q.shape, -1.0, tl.float32), 1.0 + b_q)
    b_s = tl.where(b_g > eps, b_g, b_fill)
    return tl.where(m_n & (b_av != 0), b_s, float("-inf"))


# small index ints (and D here: a memory-light pass) are not specialised: fewer variants
@triton.jit(do_not_specialize=["D", "NT_CAP"])
def _dpp_prep_kernel(
    f_ptr,
    rel_ptr,
    cand_ptr,
    cu_ptr,
    q_ptr,
    w_ptr,
    gain_ptr,
    avail_ptr,
    pmax_ptr,
    D,
    NT_CAP,
    HAS_Q: tl.constexpr,
    HAS_CAND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    bos = tl.load(cu_ptr + i_b)
    n = (tl.load(cu_ptr + i_b + 1) - bos).to(tl.int32)
    if i_t * BLOCK_N >= n:
        return
    o_n = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n
    b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        p_f = f_ptr + (bos + o_n)[:, None] * D + o_d[None, :]
        b_f = tl.load(p_f, mask=m_n[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
        b_sq += tl.sum(b_f * b_f, axis=1)
    if HAS_Q:
        b_q = tl.maximum(tl.load(rel_ptr + bos + o_n, mask=m_n, other=0.0).to(tl.float32), 0.0)
    else:
        b_q = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    b_w = tl.div_rn(b_q, tl.maximum(tl.sqrt_rn(b_sq), 1e-12))
    b_diag = (b_sq * b_w) * b_w
    if HAS_CAND:
        b_av = tl.load(cand_ptr + bos + o_n, mask=m_n, other=0).to(tl.int8)
    else:
        b_av = tl.full([BLOCK_N], 1, dtype=tl.int8)
    tl.store(q_ptr + bos + o_n, b_q, mask=m_n)
    tl.store(w_ptr + bos + o_n, b_w, mask=m_n)
    tl.store(gain_ptr + bos + o_n, b_diag, mask=m_n)
    tl.store(avail_ptr + bos + o_n, b_av, mask=m_n)
    tl.store(pmax_ptr + i_b * NT_CAP + i_t, tl.max(tl.where(m_n, b_diag, 0.0), axis=0))


@triton.jit
def _dpp_gram_kernel(
    f_ptr,
    cu_ptr,
    soff_ptr,
    s_ptr,
    D,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_m, i_n, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_ptr + i_b)
    n = (tl.load(cu_ptr + i_b + 1) - bos).to(tl.int32)
    # upper triangle of tiles only; the lower one is its mirror
    if (i_n < i_m) | (i_n * BLOCK_M >= n):
        return
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m, m_n = o_m < n, o_n < n
    b_acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        p_a = f_ptr + (bos + o_m)[:, None] * D + o_d[None, :]
        p_b = f_ptr + (bos + o_n)[None, :] * D + o_d[:, None]
        b_a = tl.load(p_a, mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_bt = tl.load(p_b, mask=m_d[:, None] & m_n[None, :], other=0.0)
        b_acc = _tile_dot(b_a, b_bt, b_acc, DOT_MODE)
    s_base = s_ptr + tl.load(soff_ptr + i_b)
    m_mn = m_m[:, None] & m_n[None, :]
    tl.store(s_base + o_m[:, None].to(tl.int64) * n + o_n[None, :], b_acc, mask=m_mn)
    if i_n > i_m:
        tl.store(s_base + o_n[None, :].to(tl.int64) * n + o_m[:, None], b_acc, mask=m_mn)


@triton.jit(do_not_specialize=["NT_CAP"])
def _dpp_init_kernel(
    q_ptr,
    cu_ptr,
    gain_ptr,
    avail_ptr,
    pmax_ptr,
    eps_ptr,
    tie_ptr,
    pval_ptr,
    NT_CAP,
    BLOCK_N: tl.constexpr,
    BLOCK_NT: tl.constexpr,
):
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    bos = tl.load(cu_ptr + i_b)
    n = (tl.load(cu_ptr + i_b + 1) - bos).to(tl.int32)
    if i_t * BLOCK_N >= n:
        return
    nt = tl.cdiv(n, BLOCK_N)
    dmax = tl.maximum(_reduce_max(pmax_ptr + i_b * NT_CAP, nt, BLOCK_NT), 1e-30)
    eps = dmax * _GAIN_EPS
    if i_t == 0:
        tl.store(eps_ptr + i_b, eps)
        tl.store(tie_ptr + i_b, dmax * _TIE_RTOL)
    o_n = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n
    b_g = tl.load(gain_ptr + bos + o_n, mask=m_n, other=0.0)
    b_q = tl.load(q_ptr + bos + o_n, mask=m_n, other=0.0)
    b_av = tl.load(avail_ptr + bos + o_n, mask=m_n, other=0)
    tl.store(pval_ptr + i_b * NT_CAP + i_t, tl.max(_dpp_score(b_g, b_q, b_av, m_n, eps), axis=0))


@triton.jit(do_not_specialize=["t", "NT_CAP", "B_CAP"])
def _dpp_step_kernel(
    desc_ptr,
    f_ptr,
    t,
    D,
    NT_CAP,
    B_CAP,
    MATERIALIZED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_NT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    # every per-call address comes from the descriptor (CUDA graphs replay the launches)
    q_ptr = tl.load(desc_ptr + 0).to(tl.pointer_type(tl.float32))
    cu_ptr = tl.load(desc_ptr + 1).to(tl.pointer_type(tl.int64))
    k_ptr = tl.load(desc_ptr + 2).to(tl.pointer_type(tl.int64))
    k = tl.load(k_ptr + i_b)
    bos = tl.load(cu_ptr + i_b)
    n = (tl.load(cu_ptr + i_b + 1) - bos).to(tl.int32)
    if (t >= k) | (i_t * BLOCK_N >= n):
        return
    w_ptr = tl.load(desc_ptr + 3).to(tl.pointer_type(tl.float32))
    gain_ptr = tl.load(desc_ptr + 4).to(tl.pointer_type(tl.float32))
    avail_ptr = tl.load(desc_ptr + 5).to(tl.pointer_type(tl.int8))
    eps_ptr = tl.load(desc_ptr + 6).to(tl.pointer_type(tl.float32))
    tie_ptr = tl.load(desc_ptr + 7).to(tl.pointer_type(tl.float32))
    soff_ptr = tl.load(desc_ptr + 8).to(tl.pointer_type(tl.int64))
    s_ptr = tl.load(desc_ptr + 9).to(tl.pointer_type(tl.float32))
    coff_ptr = tl.load(desc_ptr + 10).to(tl.pointer_type(tl.int64))
    c_ptr = tl.load(desc_ptr + 11).to(tl.pointer_type(tl.float32))
    pval_ptr = tl.load(desc_ptr + 12).to(tl.pointer_type(tl.float32))
    picks_ptr = tl.load(desc_ptr + 13).to(tl.pointer_type(tl.int64))
    T = tl.load(desc_ptr + 14)
    max_k = tl.load(desc_ptr + 15)

    nt = tl.cdiv(n, BLOCK_N)
    # state of step t (gains, avail, tile bests) is read from buffer t % 2 and written to
    # the other, so every program sees the same scores while the picks' owners update theirs
    g_in = gain_ptr + (t % 2) * T + bos
    a_in = avail_ptr + (t % 2) * T + bos
    g_out = gain_ptr + ((t + 1) % 2) * T + bos
    a_out = avail_ptr + ((t + 1) % 2) * T + bos
    p_in = pval_ptr + (t % 2) * B_CAP * NT_CAP + i_b * NT_CAP
    best = _reduce_max(p_in, nt, BLOCK_NT)
    eps = tl.load(eps_ptr + i_b)
    thr = tl.where(best > eps, best - tl.load(tie_ptr + i_b), best)
    # the pick: the lowest index whose score is within the tie window of the best, which
    # lies in the first tile whose best reaches the window (earlier tiles' bests are below)
    i_first = _first_at_least(p_in, nt, thr, BLOCK_NT)
    o_s = i_first * BLOCK_N + tl.arange(0, BLOCK_N)
    m_s = o_s < n
    b_sg = tl.load(g_in + o_s, mask=m_s, other=0.0)
    b_sq = tl.load(q_ptr + bos + o_s, mask=m_s, other=0.0)
    b_sa = tl.load(a_in + o_s, mask=m_s, other=0)
    b_ss = _dpp_score(b_sg, b_sq, b_sa, m_s, eps)
    j = tl.min(tl.where(b_ss >= thr, o_s, _NO_PICK), axis=0)
    # never address outside the image, even if no token were eligible (callers ensure
    # k <= the eligible count, so this clamp does not change a valid pick)
    j = tl.minimum(j, n - 1)
    if i_t == 0:
        tl.store(picks_ptr + i_b * max_k + t, j.to(tl.int64))
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
                p_f = f_ptr + (bos + o_n)[:, None] * D + o_d[None, :]
                b_f = tl.load(p_f, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
                p_fj = f_ptr + (bos + j) * D + o_d
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
    b_q = tl.load(q_ptr + bos + o_n, mask=m_n, other=0.0)
    b_s = _dpp_score(b_g, b_q, b_av, m_n, eps)
    p_out = pval_ptr + ((t + 1) % 2) * B_CAP * NT_CAP + i_b * NT_CAP
    tl.store(p_out + i_t, tl.max(b_s, axis=0))


def _blocks(max_n: int, d: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_T, BLOCK_D (rows, and prep), Gram BLOCK_M, Gram BLOCK_D).

    Wide tiles for the interpreter (numpy is fast on big blocks, slow per program),
    narrow ones on a GPU: a step is latency-bound, and its cost grows with what one
    program reads (its tile of each earlier Cholesky row: 128-token tiles ran 9.9 us per
    step at 2880 tokens on an H200, 23 programs busy) and with its chain of dependent
    loads (the rows path's and the prep's D loop). Tests patch this to force many tiles.
    """
    if not gpu_path(device):
        blk_n = min(1024, triton.next_power_of_2(max(max_n, 16)))
        blk_d = min(256, triton.next_power_of_2(max(d, 16)))
        return blk_n, 256, blk_d, min(128, blk_n), 16
    return 32, 64, 128, 64, 64


def use_gram(lengths: list[int], ks: list[int], device: torch.device) -> bool:
    """Materialise the Gram matrices (one GEMM, N^2 fp32 each) or form rows on the fly.

    GPU: the GEMM costs N^2*D FLOPs on tensor cores (~0.1 ms at N = 2880, D = 4096 in
    bf16) against K*N*D re-read from memory one row per step (memory-bound, ~3 ms there),
    and only the materialised path's steps are replayed from a CUDA graph: materialise
    whenever one image's matrix fits `gram_max_bytes()` (callers split batches).
    Interpreter (CPU): both are numpy without BLAS (see `dot_mode`), so count FLOPs: rows
    (K*N*D) unless K > N/4 (the Gram's N^2*D, in bigger tiles, is then cheaper).
    """
    if not gpu_path(device):
        return 4 * max(ks, default=0) > max(lengths, default=0)
    return max(lengths, default=0) ** 2 * 4 <= gram_max_bytes()


def gram_groups(lengths: list[int], limit: int) -> list[list[int]]:
    """Image indices in consecutive groups whose Gram matrices (N^2 fp32 each) fit `limit`
    bytes together (an image alone in its group may exceed it)."""
    groups: list[list[int]] = []
    size = 0
    for b, n in enumerate(lengths):
        need = n * n * 4
        if not groups or size + need > limit:
            groups.append([])
            size = 0
        groups[-1].append(b)
        size += need
    return groups


_GRAPHS = StepGraphs("DPP")


def _select_group(
    features: torch.Tensor,
    lengths: list[int],
    starts: list[int],
    rel: torch.Tensor | None,
    cand: torch.Tensor | None,
    k: list[int],
    gram: bool,
) -> torch.Tensor:
    """One group of images -> picks [B, max k] (local indices; row b valid up to k[b])."""
    device = features.device
    bsz, d = len(lengths), features.shape[1]
    max_n, max_k = max(lengths), max(k)
    block_n, block_t, block_d, gram_m, gram_d = _blocks(max_n, d, device)
    on_gpu = gpu_path(device) and not recording()
    nt = triton.cdiv(max_n, block_n)
    # graph buckets: powers of two of the grid, multiples of STEP_BUCKET of the steps
    nt_cap = triton.next_power_of_2(nt) if on_gpu else nt
    b_cap = triton.next_power_of_2(bsz) if on_gpu else bsz
    steps = triton.cdiv(max_k, STEP_BUCKET) * STEP_BUCKET if on_gpu else max_k

    # the group's rows, packed (a view when they are consecutive, as in a batch split into
    # groups); cu / k / offsets padded to the bucket (empty images)
    ends = [s + n for s, n in zip(starts, lengths, strict=True)]
    if starts[1:] == ends[:-1]:
        rows = slice(starts[0], ends[-1])
        feats = features[rows]
        q_in = None if rel is None else rel[rows]
        c_in = None if cand is None else cand[rows]
    else:
        spans = zip(starts, ends, strict=True)
        idx = torch.cat([torch.arange(s, e, device=device) for s, e in spans])
        feats = features.index_select(0, idx)
        q_in = None if rel is None else rel.index_select(0, idx)
        c_in = None if cand is None else cand.index_select(0, idx)
    total = sum(lengths)
    cu_host = [0]
    for n_b in lengths:
        cu_host.append(cu_host[-1] + n_b)
    cu_host += [total] * (b_cap - bsz)
    c_sizes = [k_b * n_b for k_b, n_b in zip(k, lengths, strict=True)]
    s_sizes = [n_b * n_b for n_b in lengths] if gram else [0] * bsz
    coff_host = [sum(c_sizes[:b]) for b in range(bsz)] + [0] * (b_cap - bsz)
    soff_host = [sum(s_sizes[:b]) for b in range(bsz)] + [0] * (b_cap - bsz)
    k_host = list(k) + [0] * (b_cap - bsz)
    ints = host_ints(cu_host + k_host + soff_host + coff_host, device)
    ints = ints.to(device, non_blocking=True)
    cu = ints[: b_cap + 1]
    kk = ints[b_cap + 1 : 2 * b_cap + 1]
    soff = ints[2 * b_cap + 1 : 3 * b_cap + 1]
    coff = ints[3 * b_cap + 1 :]

    f32 = torch.float32
    q = torch.empty(total, dtype=f32, device=device)
    w = torch.empty(total, dtype=f32, device=device)
    gains = torch.empty(2, total, dtype=f32, device=device)  # double-buffered
    avail = torch.empty(2, total, dtype=torch.int8, device=device)
    pmax = torch.zeros(b_cap, nt_cap, dtype=f32, device=device)
    eps = torch.empty(b_cap, dtype=f32, device=device)
    tie = torch.empty(b_cap, dtype=f32, device=device)
    pval = torch.full((2, b_cap, nt_cap), float("-inf"), dtype=f32, device=device)
    picks = torch.zeros(bsz, max_k, dtype=torch.int64, device=device)
    chol = torch.zeros(max(sum(c_sizes), 1), dtype=f32, device=device)
    sim = torch.empty(max(sum(s_sizes), 1), dtype=f32, device=device)

    grid = (nt, bsz)
    launch(
        _dpp_prep_kernel, grid,
        feats, q if q_in is None else q_in, w if c_in is None else c_in, cu,
        q, w, gains, avail, pmax, d, nt_cap,
        HAS_Q=q_in is not None, HAS_CAND=c_in is not None, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    if gram:
        g_tiles = triton.cdiv(max_n, gram_m)
        launch(
            _dpp_gram_kernel, (g_tiles, g_tiles, bsz),
            feats, cu, soff, sim, d,
            DOT_MODE=dot_mode(feats.dtype, device), BLOCK_M=gram_m, BLOCK_D=gram_d,
        )  # fmt: skip
    launch(
        _dpp_init_kernel, grid,
        q, cu, gains, avail, pmax, eps, tie, pval, nt_cap,
        BLOCK_N=block_n, BLOCK_NT=BLOCK_NT,
    )  # fmt: skip

    desc = host_ints(
        [
            q.data_ptr(), cu.data_ptr(), kk.data_ptr(), w.data_ptr(), gains.data_ptr(),
            avail.data_ptr(), eps.data_ptr(), tie.data_ptr(), soff.data_ptr(), sim.data_ptr(),
            coff.data_ptr(), chol.data_ptr(), pval.data_ptr(), picks.data_ptr(), total, max_k,
        ],
        device,
    )  # fmt: skip
    assert desc.numel() == DESC_LEN
    step_grid = (nt_cap, b_cap)

    def launch_steps(desc_dev: torch.Tensor) -> None:
        for t in range(steps):
            launch(
                _dpp_step_kernel, step_grid,
                desc_dev, feats, t, d, nt_cap, b_cap,
                MATERIALIZED=gram, BLOCK_N=block_n, BLOCK_NT=BLOCK_NT, BLOCK_T=block_t,
                BLOCK_D=block_d,
            )  # fmt: skip

    if on_gpu and gram:
        key = (device, step_grid, steps, block_n, block_t)
        _GRAPHS.run(key, desc, launch_steps)
    else:
        launch_steps(desc.to(device, non_blocking=True))
    return picks


def dpp_greedy_map_varlen(
    features: torch.Tensor,
    cu_seqlens: torch.Tensor | list[int],
    relevance: torch.Tensor | None,
    k: list[int],
    *,
    candidates: torch.Tensor | None = None,
    materialize: bool | None = None,
) -> list[torch.Tensor]:
    """Triton twin of `vllm_script.reference.dpp.dpp_greedy_map_varlen` (same contract).

    `cu_seqlens` may be a host list (no device sync). `materialize`: None picks by size
    (`use_gram`, batches split by `gram_groups`); True/False forces a path for the whole
    batch. Inputs assumed validated (see `vllm_script.ops`).
    """
    device = features.device
    bounds = cu_seqlens if isinstance(cu_seqlens, list) else cu_seqlens.tolist()
    bsz = len(bounds) - 1
    lengths = [bounds[b + 1] - bounds[b] for b in range(bsz)]
    out: list[torch.Tensor | None] = [None] * bsz
    live = [b for b in range(bsz) if k[b] > 0 and lengths[b] > 0]
    for b in range(bsz):
        if b not in live:
            out[b] = torch.empty(0, dtype=torch.long, device=device)
    if not live:
        return out  # type: ignore[return-value]
    features = features.contiguous()
    if features.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        features = features.float()
    rel = None if relevance is None else relevance.contiguous()
    cand = None if candidates is None else candidates.contiguous()

    if materialize is None:
        small = [b for b in live if use_gram([lengths[b]], [k[b]], device)]
        if gpu_path(device):
            groups = [
                ([small[i] for i in g], True)
                for g in gram_groups([lengths[b] for b in small], gram_max_bytes())
            ]
        else:  # the interpreter's choice is per batch (FLOP count)
            groups = [(small, True)] if small else []
        rest = [b for b in live if b not in small]
        if rest:
            groups.append((rest, False))
    else:
        groups = [(live, bool(materialize))]
    for members, gram in groups:
        if not members:
            continue
        picks = _select_group(
            features,
            [lengths[b] for b in members],
            [bounds[b] for b in members],
            rel,
            cand,
            [k[b] for b in members],
            gram,
        )
        for row, b in enumerate(members):
            out[b] = picks[row, : k[b]]
    return out  # type: ignore[return-value]


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
    if bsz == 0:
        return torch.empty(0, k, dtype=torch.long, device=features.device)
    out = dpp_greedy_map_varlen(
        features.reshape(bsz * n, d),
        list(range(0, (bsz + 1) * n, n)),
        None if relevance is None else relevance.reshape(bsz * n),
        [k] * bsz,
        candidates=None if candidates is None else candidates.reshape(bsz * n),
        materialize=materialize,
    )
    return torch.stack(out)
