"""Triton kernels: DivPrune's greedy max-min selection on `1 - cos`, batched.

Twin (oracle and CPU path): `vllm_script.methods.divprune.divprune_order`, same rule:
the first pick is the token whose nearest other token is farthest (`argmax_i min_{j != i}
(1 - S_ij)`), then repeatedly the unpicked token with the largest distance to its nearest
picked token; ties (within `TIE_ATOL`) to the lowest index. `S_ij = (f_i . f_j) (r_i r_j)`,
symmetric whenever the dots are, `r = 1 / max(||f||, 1e-12)`, fp32 accumulation (see
`vllm_script.kernels.dpp.dot_mode`).

Plan: inverse norms (`vllm_script.kernels.bipartite.inverse_norms`); the Gram matrices
F F^T (`vllm_script.kernels.dpp._dpp_gram_kernel`) while they fit
`vllm_script.kernels.dpp.gram_max_bytes()`, else rows on the fly; `_divprune_nn_kernel`
gives each token its nearest-neighbour distance (the scores of step 0) and per-tile
bests; then one
`_divprune_step_kernel` launch per pick for all images together: every program finds the
pick from the per-tile bests, folds row S[j, tile] into its tokens' running minimum and
publishes its tile's best (double-buffered). On a GPU the step launches are replayed from
a CUDA graph per shape bucket (`launch.StepGraphs`), as for the DPP.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vllm_script.kernels.bipartite import inverse_norms
from vllm_script.kernels.dpp import (
    BLOCK_NT,
    _dpp_gram_kernel,
    _first_at_least,
    _reduce_max,
    _tile_dot,
    dot_mode,
    gram_groups,
    gram_max_bytes,
)
from vllm_script.kernels.launch import (
    STEP_BUCKET,
    StepGraphs,
    gpu_path,
    host_ints,
    launch,
    recording,
)

from vllm_script.reference.divprune import TIE_ATOL

_NO_PICK = tl.constexpr(2147483647)
_TIE_ATOL = tl.constexpr(TIE_ATOL)


@triton.jit(do_not_specialize=["N", "NT_CAP"])
def _divprune_nn_kernel(
    f_ptr,
    inv_ptr,
    s_ptr,
    score_ptr,
    pval_ptr,
    N,
    D,
    NT_CAP,
    MATERIALIZED: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """score_i = 1 - max_{j != i} S_ij (+inf when N == 1); per tile of BLOCK_M the best."""
    i_m, i_b = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    bos = i_b.to(tl.int64) * N
    b_inv_m = tl.load(inv_ptr + bos + o_m, mask=m_m, other=0.0)
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        if MATERIALIZED:
            p_s = s_ptr + bos * N + o_m[:, None].to(tl.int64) * N + o_n[None, :]
            b_dot = tl.load(p_s, mask=m_m[:, None] & m_n[None, :], other=0.0)
        else:
            b_dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                m_d = o_d < D
                b_a = tl.load(
                    f_ptr + (bos + o_m)[:, None] * D + o_d[None, :],
                    mask=m_m[:, None] & m_d[None, :],
                    other=0.0,
                )
                b_bt = tl.load(
                    f_ptr + (bos + o_n)[None, :] * D + o_d[:, None],
                    mask=m_d[:, None] & m_n[None, :],
                    other=0.0,
                )
                b_dot = _tile_dot(b_a, b_bt, b_dot, DOT_MODE)
        b_inv_n = tl.load(inv_ptr + bos + o_n, mask=m_n, other=0.0)
        # dot * (r_i r_j): the same value for (i, j) and (j, i) when the dots are
        b_sim = b_dot * (b_inv_m[:, None] * b_inv_n[None, :])
        m_other = m_n[None, :] & (o_m[:, None] != o_n[None, :])
        b_max = tl.maximum(b_max, tl.max(tl.where(m_other, b_sim, float("-inf")), axis=1))
    b_score = 1.0 - b_max
    tl.store(score_ptr + bos + o_m, b_score, mask=m_m)
    best = tl.max(tl.where(m_m, b_score, float("-inf")), axis=0)
    tl.store(pval_ptr + i_b * NT_CAP + i_m, best)


@triton.jit(do_not_specialize=["t", "NT_CAP", "B_CAP"])
def _divprune_step_kernel(
    desc_ptr,
    f_ptr,
    t,
    D,
    NT_CAP,
    B_CAP,
    MATERIALIZED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_NT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    N = tl.load(desc_ptr + 6).to(tl.int32)
    K = tl.load(desc_ptr + 7)
    B = tl.load(desc_ptr + 8)
    if (t >= K) | (i_b >= B) | (i_t * BLOCK_N >= N):
        return
    s_ptr = tl.load(desc_ptr + 0).to(tl.pointer_type(tl.float32))
    inv_ptr = tl.load(desc_ptr + 1).to(tl.pointer_type(tl.float32))
    score_ptr = tl.load(desc_ptr + 2).to(tl.pointer_type(tl.float32))
    md_ptr = tl.load(desc_ptr + 3).to(tl.pointer_type(tl.float32))
    pval_ptr = tl.load(desc_ptr + 4).to(tl.pointer_type(tl.float32))
    order_ptr = tl.load(desc_ptr + 5).to(tl.pointer_type(tl.int64))
    T = B * N
    bos = i_b.to(tl.int64) * N
    nt = tl.cdiv(N, BLOCK_N)
    # scores and tile bests of step t live in buffer t % 2 (see vllm_script.kernels.dpp)
    s_in = score_ptr + (t % 2) * T + bos
    s_out = score_ptr + ((t + 1) % 2) * T + bos
    p_in = pval_ptr + (t % 2) * B_CAP * NT_CAP + i_b * NT_CAP
    thr = _reduce_max(p_in, nt, BLOCK_NT) - _TIE_ATOL
    # the lowest index within the tie window lies in the first tile whose best reaches it
    i_first = _first_at_least(p_in, nt, thr, BLOCK_NT)
    o_s = i_first * BLOCK_N + tl.arange(0, BLOCK_N)
    b_ss = tl.load(s_in + o_s, mask=o_s < N, other=float("-inf"))
    j = tl.min(tl.where(b_ss >= thr, o_s, _NO_PICK), axis=0)
    j = tl.minimum(j, N - 1)  # never address outside the image
    if i_t == 0:
        tl.store(order_ptr + i_b * K + t, j.to(tl.int64))

    o_n = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    if MATERIALIZED:
        b_dot = tl.load(s_ptr + bos * N + j.to(tl.int64) * N + o_n, mask=m_n, other=0.0)
    else:
        b_dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            p_f = f_ptr + (bos + o_n)[:, None] * D + o_d[None, :]
            b_f = tl.load(p_f, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_fj = tl.load(f_ptr + (bos + j) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_dot += tl.sum(b_f * b_fj[None, :], axis=1)
    b_inv = tl.load(inv_ptr + bos + o_n, mask=m_n, other=0.0)
    b_dist = 1.0 - b_dot * (b_inv * tl.load(inv_ptr + bos + j))
    b_md = tl.minimum(tl.load(md_ptr + bos + o_n, mask=m_n, other=0.0), b_dist)
    tl.store(md_ptr + bos + o_n, b_md, mask=m_n)
    b_prev = tl.load(s_in + o_n, mask=m_n, other=float("-inf"))
    m_out = (o_n == j) | (b_prev == float("-inf"))  # picked now or before
    b_score = tl.where(m_out, float("-inf"), b_md)
    tl.store(s_out + o_n, b_score, mask=m_n)
    p_out = pval_ptr + ((t + 1) % 2) * B_CAP * NT_CAP + i_b * NT_CAP
    tl.store(p_out + i_t, tl.max(tl.where(m_n, b_score, float("-inf")), axis=0))


def _blocks(n: int, d: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N tokens per program and step, nn-kernel BLOCK_N columns, BLOCK_D)."""
    if not gpu_path(device):  # interpreter: few wide programs, narrow broadcast dots
        return (
            min(1024, triton.next_power_of_2(max(n, 16))),
            min(64, triton.next_power_of_2(max(n, 16))),  # BLOCK_N * 64 * 16 <= 2^20
            16,
        )
    return 128, 64, 64


_GRAPHS = StepGraphs("DivPrune")


def _order_group(features: torch.Tensor, k: int, materialize: bool) -> torch.Tensor:
    """[B, N, D] (one group), k -> pick order [B, k]."""
    bsz, n, d = features.shape
    device = features.device
    block_n, nn_cols, block_d = _blocks(n, d, device)
    on_gpu = gpu_path(device) and not recording()
    nt = triton.cdiv(n, block_n)
    nt_cap = triton.next_power_of_2(nt) if on_gpu else nt
    b_cap = triton.next_power_of_2(bsz) if on_gpu else bsz
    steps = triton.cdiv(k, STEP_BUCKET) * STEP_BUCKET if on_gpu else k
    flat = features.reshape(bsz * n, d)
    total = bsz * n

    inv = inverse_norms(flat, block_d)
    sim = torch.empty(bsz * n * n if materialize else 1, dtype=torch.float32, device=device)
    if materialize:
        offsets = torch.arange(0, (bsz + 1) * n * n, n * n, device=device)
        cu = torch.arange(0, (bsz + 1) * n, n, device=device)
        gram_m = 64 if on_gpu or recording() else min(128, triton.next_power_of_2(max(n, 16)))
        g_tiles = triton.cdiv(n, gram_m)
        launch(
            _dpp_gram_kernel, (g_tiles, g_tiles, bsz),
            flat, cu, offsets, sim, d,
            DOT_MODE=dot_mode(flat.dtype, device), BLOCK_M=gram_m, BLOCK_D=block_d,
        )  # fmt: skip
    scores = torch.empty(2, total, dtype=torch.float32, device=device)
    min_dist = torch.full((total,), float("inf"), dtype=torch.float32, device=device)
    pval = torch.full((2, b_cap, nt_cap), float("-inf"), dtype=torch.float32, device=device)
    order = torch.zeros(bsz, k, dtype=torch.int64, device=device)
    launch(
        _divprune_nn_kernel, (nt, bsz),
        flat, inv, sim, scores, pval, n, d, nt_cap,
        MATERIALIZED=materialize, DOT_MODE=dot_mode(flat.dtype, device), BLOCK_M=block_n,
        BLOCK_N=nn_cols, BLOCK_D=block_d,
    )  # fmt: skip
    desc = host_ints(
        [
            sim.data_ptr(), inv.data_ptr(), scores.data_ptr(), min_dist.data_ptr(),
            pval.data_ptr(), order.data_ptr(), n, k, bsz,
        ],
        device,
    )  # fmt: skip
    step_grid = (nt_cap, b_cap)

    def launch_steps(desc_dev: torch.Tensor) -> None:
        for t in range(steps):
            launch(
                _divprune_step_kernel, step_grid,
                desc_dev, flat, t, d, nt_cap, b_cap,
                MATERIALIZED=materialize, BLOCK_N=block_n, BLOCK_NT=BLOCK_NT, BLOCK_D=block_d,
            )  # fmt: skip

    if on_gpu and materialize:
        _GRAPHS.run((device, step_grid, steps, block_n), desc, launch_steps)
    else:
        launch_steps(desc.to(device, non_blocking=True))
    return order


def divprune_order(
    features: torch.Tensor, k: int, *, materialize: bool | None = None
) -> torch.Tensor:
    """Triton twin of `vllm_script.methods.divprune.divprune_order`: [B, N, D], k -> [B, k].

    1 <= k <= N assumed (see `divprune_select`). `materialize`: None chooses by size (Gram
    matrices while one fits `gram_max_bytes()`, batches split into groups that fit).
    """
    features = features.contiguous()
    if features.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        features = features.float()
    bsz, n, _ = features.shape
    if materialize is not None:
        return _order_group(features, k, materialize)
    if n * n * 4 > gram_max_bytes():
        return _order_group(features, k, False)
    groups = gram_groups([n] * bsz, gram_max_bytes())
    parts = [_order_group(features[g[0] : g[-1] + 1], k, True) for g in groups]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
