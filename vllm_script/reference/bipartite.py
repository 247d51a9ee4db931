"""Bipartite similarity statistics for GSP, in pure PyTorch, tile by tile.

CPU path and oracle of the Triton kernel (`vllm_script.kernels.bipartite`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_script.cpu_threads import gemm_threads
from vllm_script.reference import dpp_cpu

# dst columns per tile: bounds the live similarity block to B * N/2 * TILE floats.
DST_TILE = 1024
# the compiled CPU pass holds one image's block, N/2 * TILE floats: one GEMM (no skinny
# remainder tile) up to 4096 tokens, LLaVA-NeXT's 2928 included (1464 x 1464, 8.6 MB)
CPU_DST_TILE = 2048


class BipartiteStats(NamedTuple):
    """Per src token (even index), against all dst tokens (odd index); each [B, N_src]."""

    degree: torch.Tensor  # int64: #{j : S_ij >= tau}
    edge_sum: torch.Tensor  # fp32: sum of S_ij over those edges
    total_sum: torch.Tensor  # fp32: sum of S_ij over all dst
    best_sim: torch.Tensor  # fp32: max_j S_ij (-inf when there is no dst)
    best_dst: torch.Tensor  # int64: argmax_j S_ij, a dst-local index, ties to lowest


def _split(features: torch.Tensor):
    """[B, N, D] -> src, dst (fp32, strided views), their inverse norms, zeroed statistics."""
    feats = features.detach().float()
    inv = 1.0 / (feats * feats).sum(-1).sqrt().clamp_min(1e-12)  # x * x: 3x pow's speed
    # strided views: a GEMM reads them in place (BLAS leading dimension 2 D)
    src, dst = feats[:, 0::2], feats[:, 1::2]
    inv_src, inv_dst = inv[:, 0::2].contiguous(), inv[:, 1::2].contiguous()
    bsz, n_src, _ = src.shape
    device = features.device
    stats = BipartiteStats(
        degree=torch.zeros(bsz, n_src, dtype=torch.long, device=device),
        edge_sum=torch.zeros(bsz, n_src, dtype=torch.float32, device=device),
        total_sum=torch.zeros(bsz, n_src, dtype=torch.float32, device=device),
        best_sim=torch.full((bsz, n_src), float("-inf"), dtype=torch.float32, device=device),
        best_dst=torch.zeros(bsz, n_src, dtype=torch.long, device=device),
    )
    return src, dst, inv_src, inv_dst, stats


def cpu_stats_and_dots(
    features: torch.Tensor, tau: float, *, keep_dots: bool = True
) -> tuple[BipartiteStats, torch.Tensor | None]:
    """[B, N, D] on CPU, tau -> (BipartiteStats, dots): the compiled CPU path (needs numba).

    `dots`: fp32 [B, ceil(N/2), N/2], src . dst as its GEMM computed them, when one tile
    held them all (N/2 <= CPU_DST_TILE) and `keep_dots`; else None. Script's DPP reads
    them instead of recomputing those pairs (`dpp_cpu.greedy_one`); Script passes one
    image at a time, so one image's block is alive at once.
    """
    from vllm_script.reference._numba_loops import bipartite_rows

    src, dst, inv_src, inv_dst, stats = _split(features)
    bsz, n_src, dim = src.shape
    n_dst = dst.shape[1]
    keep = keep_dots and n_dst <= CPU_DST_TILE
    kept = torch.empty(bsz, n_src, n_dst, dtype=torch.float32) if keep else None
    for b in range(bsz):
        # one compiled pass per tile of dots instead of a dozen full-size tensor ops
        for start in range(0, n_dst, CPU_DST_TILE):
            stop = start + CPU_DST_TILE
            tile = dst[b, start:stop]
            with gemm_threads(n_src * tile.shape[0] * dim):
                dots = torch.mm(src[b], tile.T, out=kept[b] if keep else None)
            bipartite_rows(
                dots.numpy(), inv_src[b].numpy(), inv_dst[b, start:stop].numpy(),
                float(tau), start, *(x[b].numpy() for x in stats),
            )  # fmt: skip
    return stats, kept


def bipartite_stats(features: torch.Tensor, tau: float) -> BipartiteStats:
    """[B, N, D], tau -> BipartiteStats with fields [B, ceil(N/2)].

    src = tokens 0, 2, 4, ...; dst = tokens 1, 3, 5, ...; `S` is the cosine similarity,
    computed as the kernel does: `S_ij = ((f_i . f_j) * r_i) * r_j` with fp32 dots and
    `r = 1 / max(||f||, 1e-12)`. dst is processed in tiles of `DST_TILE` columns, so no
    [N/2, N/2] matrix larger than one tile is materialised. On CPU tensors (with numba) tiles are
    `CPU_DST_TILE` wide and one compiled pass per tile folds the dots into the
    statistics; elsewhere tensor ops do.
    """
    if features.device.type == "cpu" and dpp_cpu.available():
        return cpu_stats_and_dots(features, tau, keep_dots=False)[0]
    src, dst, inv_src, inv_dst, stats = _split(features)
    degree, edge_sum, total_sum, best_sim, best_dst = stats
    n_dst = dst.shape[1]
    for start in range(0, n_dst, DST_TILE):
        b_sim = torch.bmm(src, dst[:, start : start + DST_TILE].transpose(1, 2))
        b_sim = (b_sim * inv_src.unsqueeze(-1)) * inv_dst[:, None, start : start + DST_TILE]
        m_edge = b_sim >= tau
        degree += m_edge.sum(-1)
        edge_sum += torch.where(m_edge, b_sim, 0.0).sum(-1)
        total_sum += b_sim.sum(-1)
        tile_arg = b_sim.argmax(dim=-1)  # documented: first maximum
        tile_max = b_sim.gather(-1, tile_arg.unsqueeze(-1)).squeeze(-1)
        # strict '>' keeps the earlier tile on ties: argmax ties go to the lowest index
        better = tile_max > best_sim
        best_sim = torch.where(better, tile_max, best_sim)
        best_dst = torch.where(better, tile_arg + start, best_dst)

    return BipartiteStats(degree, edge_sum, total_sum, best_sim, best_dst)
