"""How many threads the selection uses on CPU.

The selection is a chain of small tensor ops (and, for the DPP, a compiled loop): under
OpenMP each op forks and joins the pool, and when the vLLM front-end and engine processes
share the worker's cores, a pool thread that is descheduled stalls every op of the others
(benchmarks/bench_kernels.py --threads 1 / 2 shows the spread on a busy machine). One
thread by default; VLLM_SCRIPT_CPU_THREADS=n uses n (0: leave torch's setting alone).
"""

from __future__ import annotations

import os

import torch

CPU_THREADS_ENV = "VLLM_SCRIPT_CPU_THREADS"
# A GEMM of at least this many multiply-adds runs on the threads torch had outside the
# selection: one large op amortises the fork/join (the bipartite statistics at LLaVA-1.5
# geometry, D = 1024, are 85 M; at LLaVA-NeXT 2.2 G).
GEMM_THREADS_MIN_MACS = 32 * 2**20
_outer: list[int] = []  # thread counts outside the active selection blocks


class selection_threads:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Run the block on the configured thread count (CPU tensors only); restore it after.

    `torch.set_num_threads` is process-wide: another Python thread running torch ops at the
    same time would see the lower count until the block ends.
    """

    def __init__(self, device: torch.device | str):
        want = int(os.environ.get(CPU_THREADS_ENV, "1"))
        self.all = torch.get_num_threads()
        cpu = torch.device(device).type == "cpu"
        self.mine = min(self.all, want) if cpu and want > 0 else self.all

    def __enter__(self):
        _outer.append(self.all)
        if self.mine != self.all:
            torch.set_num_threads(self.mine)
        return self

    def __exit__(self, *exc):
        _outer.pop()
        if self.mine != self.all:
            torch.set_num_threads(self.all)


class gemm_threads:  # noqa: N801 - a context manager
    """Inside a `selection_threads` block: run one GEMM of `macs` multiply-adds on the
    threads torch had outside the block when it is large (GEMM_THREADS_MIN_MACS)."""

    def __init__(self, macs: int):
        self.now = torch.get_num_threads()
        self.want = _outer[-1] if _outer and macs >= GEMM_THREADS_MIN_MACS else self.now

    def __enter__(self):
        if self.want != self.now:
            torch.set_num_threads(self.want)
        return self

    def __exit__(self, *exc):
        if self.want != self.now:
            torch.set_num_threads(self.now)
