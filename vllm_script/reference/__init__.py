"""Pure-PyTorch twins of the Triton kernels: the CPU path and the kernels' oracles."""

from vllm_script.reference.bipartite import BipartiteStats, bipartite_stats
from vllm_script.reference.dpp import (
    dpp_greedy_map,
    dpp_greedy_map_materialized,
    dpp_greedy_map_varlen,
)

__all__ = [
    "BipartiteStats",
    "bipartite_stats",
    "dpp_greedy_map",
    "dpp_greedy_map_materialized",
    "dpp_greedy_map_varlen",
]
