"""Triton kernel: bipartite similarity statistics for GSP, tile by tile.

Twin (oracle and CPU path): `vllm_script.reference.bipartite.bipartite_stats`, same
signature and arithmetic: `S_ij = ((f_i . f_j) * r_i) * r_j`, fp32 accumulation (bf16/fp16
products exact on tensor cores; fp32 inputs as 3xTF32, see
`vllm_script.kernels.dpp.dot_mode`), `r = 1 / max(||f||, 1e-12)`.

One program per (tile of BLOCK_M src tokens, split of the dst tokens, image) walks its
split in tiles of BLOCK_N, keeping per src row the degree (#S >= tau), the sum over those
edges, the sum over all dst, and the running max with its first argmax (strict `>` across
tiles keeps ties on the lowest dst index), and writes them as partials; a second kernel
adds the partials in split order (deterministic) and keeps the first best across splits.
Splitting dst fills the GPU (1440 src rows are only 23 tiles of 64). No similarity matrix
is ever written: memory O(splits * B * N) besides the features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vllm_script.kernels.dpp import _tile_dot, dot_mode
from vllm_script.kernels.launch import gpu_path, launch

from vllm_script.reference.bipartite import BipartiteStats


@triton.jit(do_not_specialize=["T"])
def _inv_norm_kernel(f_ptr, inv_ptr, T, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i_t = tl.program_id(0)
    o_n = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < T
    b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        p_f = f_ptr + o_n[:, None].to(tl.int64) * D + o_d[None, :]
        b_f = tl.load(p_f, mask=m_n[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
        b_sq += tl.sum(b_f * b_f, axis=1)
    b_inv = tl.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(b_sq), 1e-12))
    tl.store(inv_ptr + o_n, b_inv, mask=m_n)


def inverse_norms(flat: torch.Tensor, interp_block_d: int) -> torch.Tensor:
    """[T, D] -> [T] fp32 1 / max(||row||, 1e-12).

    A memory-light pass whose cost is its chain of dependent loads: on a GPU 16 rows per
    program in 256-wide chunks (a few hundred programs, 16 loads each; 128 rows in 64-wide
    chunks took 54 us at 576 x 4096 on an H200), few wide programs for the interpreter.
    """
    total, d = flat.shape
    block_n, block_d = (16, 256) if gpu_path(flat.device) else (128, max(interp_block_d, 64))
    inv = torch.empty(total, dtype=torch.float32, device=flat.device)
    launch(
        _inv_norm_kernel, (triton.cdiv(total, block_n),),
        flat, inv, total, d, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return inv


@triton.jit(do_not_specialize=["N", "N_SRC", "N_DST", "SPLIT"])
def _bipartite_kernel(
    f_ptr,
    inv_ptr,
    deg_ptr,
    esum_ptr,
    tsum_ptr,
    bsim_ptr,
    bdst_ptr,
    tau,
    N,
    D,
    N_SRC,
    N_DST,
    SPLIT,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_m, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_blocks = tl.num_programs(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N_SRC
    tok_m = i_b.to(tl.int64) * N + 2 * o_m  # src = even tokens
    b_inv_m = tl.load(inv_ptr + tok_m, mask=m_m, other=0.0)
    b_deg = tl.zeros([BLOCK_M], dtype=tl.int32)
    b_esum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_tsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    lo = i_s * SPLIT
    hi = tl.minimum(lo + SPLIT, N_DST)
    for n0 in range(lo, hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        tok_n = i_b.to(tl.int64) * N + 2 * o_n + 1  # dst = odd tokens
        b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_a = tl.load(
                f_ptr + tok_m[:, None] * D + o_d[None, :],
                mask=m_m[:, None] & m_d[None, :],
                other=0.0,
            )
            b_bt = tl.load(
                f_ptr + tok_n[None, :] * D + o_d[:, None],
                mask=m_d[:, None] & m_n[None, :],
                other=0.0,
            )
            b_acc = _tile_dot(b_a, b_bt, b_acc, DOT_MODE)
        b_inv_n = tl.load(inv_ptr + tok_n, mask=m_n, other=0.0)
        b_sim = (b_acc * b_inv_m[:, None]) * b_inv_n[None, :]
        m_edge = (b_sim >= tau) & m_n[None, :]
        b_deg += tl.sum(m_edge.to(tl.int32), axis=1)
        b_esum += tl.sum(tl.where(m_edge, b_sim, 0.0), axis=1)
        b_tsum += tl.sum(tl.where(m_n[None, :], b_sim, 0.0), axis=1)
        b_tmax, b_targ = tl.max(
            tl.where(m_n[None, :], b_sim, float("-inf")),
            axis=1,
            return_indices=True,
            return_indices_tie_break_left=True,
        )
        m_better = b_tmax > b_best
        b_best = tl.where(m_better, b_tmax, b_best)
        b_arg = tl.where(m_better, b_targ + n0, b_arg)
    # partials [split, B, N_SRC]
    o_out = (i_s * n_blocks + i_b).to(tl.int64) * N_SRC + o_m
    tl.store(deg_ptr + o_out, b_deg, mask=m_m)
    tl.store(esum_ptr + o_out, b_esum, mask=m_m)
    tl.store(tsum_ptr + o_out, b_tsum, mask=m_m)
    tl.store(bsim_ptr + o_out, b_best, mask=m_m)
    tl.store(bdst_ptr + o_out, b_arg, mask=m_m)


@triton.jit(do_not_specialize=["M", "N_SPLIT"])
def _bipartite_reduce_kernel(
    pdeg_ptr,
    pesum_ptr,
    ptsum_ptr,
    pbsim_ptr,
    pbdst_ptr,
    deg_ptr,
    esum_ptr,
    tsum_ptr,
    bsim_ptr,
    bdst_ptr,
    M,
    N_SPLIT,
    BLOCK: tl.constexpr,
):
    """Partials [N_SPLIT, M] -> totals [M], in split order (ties: the earliest split)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < M
    b_deg = tl.zeros([BLOCK], dtype=tl.int32)
    b_esum = tl.zeros([BLOCK], dtype=tl.float32)
    b_tsum = tl.zeros([BLOCK], dtype=tl.float32)
    b_best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    b_arg = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(0, N_SPLIT):
        p = s * M + o
        b_deg += tl.load(pdeg_ptr + p, mask=m, other=0)
        b_esum += tl.load(pesum_ptr + p, mask=m, other=0.0)
        b_tsum += tl.load(ptsum_ptr + p, mask=m, other=0.0)
        b_sim = tl.load(pbsim_ptr + p, mask=m, other=float("-inf"))
        m_better = b_sim > b_best
        b_best = tl.where(m_better, b_sim, b_best)
        b_arg = tl.where(m_better, tl.load(pbdst_ptr + p, mask=m, other=0), b_arg)
    tl.store(deg_ptr + o, b_deg.to(tl.int64), mask=m)
    tl.store(esum_ptr + o, b_esum, mask=m)
    tl.store(tsum_ptr + o, b_tsum, mask=m)
    tl.store(bsim_ptr + o, b_best, mask=m)
    tl.store(bdst_ptr + o, b_arg.to(tl.int64), mask=m)


def _blocks(n_src: int, n_dst: int, d: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M src, BLOCK_N dst, BLOCK_D, dst per split): wide tiles and one split for the
    interpreter (fast on big blocks, slow per program); MMA-sized tiles on a GPU, with dst
    split so that even one image gives a few hundred programs."""
    if not gpu_path(device):
        return (
            min(128, triton.next_power_of_2(max(n_src, 16))),
            min(128, triton.next_power_of_2(max(n_dst, 16))),
            min(32, triton.next_power_of_2(max(d, 16))),
            max(n_dst, 1),
        )
    return 64, 64, 64, 256


def bipartite_stats(features: torch.Tensor, tau: float) -> BipartiteStats:
    """Triton twin of `vllm_script.reference.bipartite.bipartite_stats` ([B, N, D], tau).

    Inputs assumed validated (see `vllm_script.ops.bipartite_stats`).
    """
    bsz, n, d = features.shape
    device = features.device
    n_src, n_dst = (n + 1) // 2, n // 2
    features = features.contiguous()
    if features.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        features = features.float()
    degree = torch.zeros(bsz, n_src, dtype=torch.long, device=device)
    edge_sum = torch.zeros(bsz, n_src, dtype=torch.float32, device=device)
    total_sum = torch.zeros(bsz, n_src, dtype=torch.float32, device=device)
    best_sim = torch.full((bsz, n_src), float("-inf"), dtype=torch.float32, device=device)
    best_dst = torch.zeros(bsz, n_src, dtype=torch.long, device=device)
    if bsz * n_src == 0:
        return BipartiteStats(degree, edge_sum, total_sum, best_sim, best_dst)
    block_m, block_n, block_d, split = _blocks(n_src, n_dst, d, device)
    n_split = max(1, triton.cdiv(n_dst, split))
    inv = inverse_norms(features.reshape(bsz * n, d), block_d)
    part = (n_split, bsz, n_src)
    p_deg = torch.empty(part, dtype=torch.int32, device=device)
    p_esum = torch.empty(part, dtype=torch.float32, device=device)
    p_tsum = torch.empty(part, dtype=torch.float32, device=device)
    p_bsim = torch.empty(part, dtype=torch.float32, device=device)
    p_bdst = torch.empty(part, dtype=torch.int32, device=device)
    launch(
        _bipartite_kernel, (triton.cdiv(n_src, block_m), n_split, bsz),
        features, inv, p_deg, p_esum, p_tsum, p_bsim, p_bdst,
        float(tau), n, d, n_src, n_dst, split,
        DOT_MODE=dot_mode(features.dtype, device), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d,
    )  # fmt: skip
    launch(
        _bipartite_reduce_kernel, (triton.cdiv(bsz * n_src, 256),),
        p_deg, p_esum, p_tsum, p_bsim, p_bdst, degree, edge_sum, total_sum, best_sim,
        best_dst, bsz * n_src, n_split, BLOCK=256,
    )  # fmt: skip
    return BipartiteStats(degree, edge_sum, total_sum, best_sim, best_dst)
