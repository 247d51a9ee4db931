"""Start-up warm-up: compile and run every selection kernel a request can reach, once.

On a CUDA device with the Triton backend, the first request would otherwise pay Triton's
JIT compile (seconds per kernel variant), and a kernel that does not compile for this GPU
would fail a request instead of the start-up. `warm_up` runs each kernel once on a small
input of the model's dtype and hidden size (the specialisations real requests use), with
the graph capture of the DPP / DivPrune steps, and raises `KernelWarmupError` naming the
kernel, the Triton / CUDA versions and how to choose the PyTorch path. On CPU it compiles
the numba loops of the CPU paths (cached on disk after the first start).
"""

from __future__ import annotations

import time

import torch

from vllm_script import ops


class KernelWarmupError(RuntimeError):
    """A selection kernel failed at start-up; the message says what to do."""


def _steps(device: torch.device, dtype: torch.dtype, hidden: int):
    """(name, callable) for every kernel path a request can reach on this device."""
    from vllm_script.kernels import divprune as kdiv
    from vllm_script.kernels import dpp as kdpp

    g = torch.Generator(device="cpu").manual_seed(0)
    n, k = 300, 20  # several GPU step tiles (32 tokens each): the multi-tile code paths
    feats = torch.randn(2, n, hidden, generator=g).to(device=device, dtype=dtype)
    rel = torch.rand(2, n, generator=g, dtype=torch.float32).to(device)
    cand = torch.ones(2, n, dtype=torch.bool, device=device)
    return [
        ("bipartite (GSP)", lambda: ops.bipartite_stats(feats, 0.2, backend="triton")),
        (
            "dpp (QCSP / Script, Gram path)",
            lambda: [
                ops.dpp_greedy_map(feats, q, k, candidates=c, backend="triton")
                for q in (None, rel)
                for c in (None, cand)
            ],
        ),
        (
            "dpp (rows path, long videos)",
            lambda: [
                kdpp.dpp_greedy_map(feats, q, k, candidates=c, materialize=False)
                for q in (None, rel)
                for c in (None, cand)
            ],
        ),
        (
            "divprune",
            lambda: [kdiv.divprune_order(feats, k, materialize=m) for m in (True, False)],
        ),
    ]


def warm_up(device: torch.device, dtype: torch.dtype, hidden: int) -> list[tuple[str, float]]:
    """Run every reachable selection kernel once; returns (name, seconds) per kernel group.

    CUDA + Triton backend: the Triton kernels (raises KernelWarmupError on failure). CPU:
    the compiled loop of the CPU greedy DPP, when numba is available. Otherwise nothing.
    """
    timings: list[tuple[str, float]] = []
    device = torch.device(device)
    if device.type == "cuda" and ops.default_backend() != "torch":
        for name, step in _steps(device, dtype, hidden):
            start = time.perf_counter()
            try:
                step()
                torch.cuda.synchronize(device)
            except Exception as exc:
                raise KernelWarmupError(
                    f"vllm-script refuses to start: the selection kernel {name} failed on "
                    f"this GPU ({ops.runtime_versions()}): {type(exc).__name__}: {exc}. "
                    f"{ops.BACKEND_HINT[0].upper()}{ops.BACKEND_HINT[1:]}."
                ) from exc
            timings.append((name, time.perf_counter() - start))
    elif device.type == "cpu":
        from vllm_script.reference import dpp_cpu

        if dpp_cpu.available():
            from vllm_script.reference.bipartite import bipartite_stats

            start = time.perf_counter()
            f32 = torch.float32  # explicit: vLLM builds the model under its dtype as default
            dpp_cpu.greedy_one(
                torch.randn(8, 4, dtype=f32), torch.rand(8, dtype=f32), torch.ones(8, dtype=bool), 3
            )
            bipartite_stats(torch.randn(1, 8, 4, dtype=f32), 0.2)
            timings.append(("compiled CPU loops (DPP, GSP)", time.perf_counter() - start))
    return timings
