"""Public selection primitives. Validate inputs, then dispatch to a backend.

`backend="torch"` runs the pure-PyTorch twins in `vllm_script.reference` (any device);
`backend="triton"` runs the kernels in `vllm_script.kernels` (CUDA tensors, or CPU under
`TRITON_INTERPRET=1`); `backend="auto"` follows the process default: the server setting
`"backend"` (`set_default_backend`), else the environment variable VLLM_SCRIPT_BACKEND,
else Triton for CUDA tensors and torch otherwise. Under "auto" a Triton kernel that fails
to compile or launch is logged once (kernel, Triton / CUDA versions) and the process
falls back to the PyTorch twins: a kernel problem never stops a request.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch

from vllm_script.reference import BipartiteStats
from vllm_script.reference import bipartite as _ref_bipartite
from vllm_script.reference import divprune as _ref_divprune
from vllm_script.reference import dpp as _ref_dpp
from vllm_script.reference import dpp_cpu as _ref_dpp_cpu

logger = logging.getLogger("vllm_script")

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "VLLM_SCRIPT_BACKEND"
BACKEND_HINT = (
    "to select tokens with the PyTorch path instead, start the server with "
    '\'"backend": "torch"\' in its --hf-overrides \'{"script": {...}}\' settings, or set '
    f"{BACKEND_ENV}=torch"
)
_process_default: str | None = None


def set_default_backend(backend: str | None) -> None:
    """The process-wide meaning of backend="auto" ("auto", "torch", "triton"; None: the
    environment's). The model sets it from the server's `backend` setting."""
    global _process_default
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    _process_default = backend


def default_backend() -> str:
    if _process_default is not None:
        return _process_default
    env = os.environ.get(BACKEND_ENV, "auto")
    if env not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={env!r} is not one of {BACKENDS}")
    return env


def _resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = default_backend()
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    return backend


def runs_compiled_cpu(features: torch.Tensor, backend: Backend = "auto") -> bool:
    """Whether the selection primitives run the numba-compiled CPU loops on `features`
    (CPU tensors, the torch backend, numba available)."""
    return (
        features.device.type == "cpu"
        and _resolve_backend(backend, features) == "torch"
        and _ref_dpp_cpu.available()
    )


def runtime_versions() -> str:
    """Triton, CUDA, torch and the device: what a kernel failure report needs."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    parts = [f"Triton {triton_version}", f"CUDA {torch.version.cuda}", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        parts.append(f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    return ", ".join(parts)


def _dispatch(backend: str, tensor: torch.Tensor, module: str, name: str, run_kernel, run_twin):
    """Run `run_kernel(kernel_fn)` or `run_twin()` per the backend (see module docstring)."""
    if _resolve_backend(backend, tensor) == "torch":
        return run_twin()
    kernel = _load_kernel(module, name)
    if backend != "auto":
        return run_kernel(kernel)
    from vllm_script.kernels.launch import KernelError

    try:
        return run_kernel(kernel)
    except KernelError as exc:
        logger.error(
            "vllm-script: %s (%s); selecting with the PyTorch twins from now on. %s.",
            exc,
            runtime_versions(),
            BACKEND_HINT,
        )
        set_default_backend("torch")
        return run_twin()


def _load_kernel(module: str, name: str):
    import importlib

    try:
        mod = importlib.import_module(f"vllm_script.kernels.{module}")
    except ImportError as exc:
        raise RuntimeError(
            f"backend='triton' needs the Triton kernel vllm_script.kernels.{module} "
            f"and the `triton` package ({exc}); use backend='torch' instead"
        ) from exc
    return getattr(mod, name)


def _check_features(features: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must have shape [B, N, D], got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a float tensor, got dtype {features.dtype}")
    return tuple(features.shape)  # type: ignore[return-value]


def _check_per_token(
    name: str, value: torch.Tensor | None, shape: tuple[int, int], device: torch.device
) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape [B, N] = {list(shape)}, got {list(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, features on {device}")


def check_dpp_inputs(
    features: torch.Tensor,
    relevance: torch.Tensor | None,
    k: int,
    *,
    candidates: torch.Tensor | None = None,
    check_values: bool = True,
) -> None:
    """`dpp_greedy_map`'s input checks (raises TypeError / ValueError); for callers that
    run a DPP path directly (Script's shared Gram on CPU)."""
    bsz, n, _ = _check_features(features)
    _check_per_token("relevance", relevance, (bsz, n), features.device)
    _check_per_token("candidates", candidates, (bsz, n), features.device)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if relevance is not None:
        if not relevance.is_floating_point():
            raise ValueError(f"relevance must be a float tensor, got dtype {relevance.dtype}")
        if check_values and (not torch.isfinite(relevance).all() or (relevance < 0).any()):
            raise ValueError("relevance must be finite and non-negative")
    if candidates is not None and candidates.dtype != torch.bool:
        raise ValueError(f"candidates must be a bool tensor, got dtype {candidates.dtype}")
    eligible = n
    if check_values and candidates is not None and bsz:
        eligible = int(candidates.sum(dim=1).min())
    if k < 1 or k > eligible:
        raise ValueError(
            f"k={k} must be in [1, {eligible}] (the smallest eligible-token count over the batch)"
        )


def check_tau(tau: float) -> None:
    """GSP's similarity threshold: a real number (raises TypeError)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")


def dpp_greedy_map(
    features: torch.Tensor,
    relevance: torch.Tensor | None,
    k: int,
    *,
    candidates: torch.Tensor | None = None,
    backend: Backend = "auto",
    check_values: bool = True,
) -> torch.Tensor:
    """[B, N, D], [B, N] | None, k -> LongTensor [B, k]: exact fast greedy DPP MAP.

    `features`: any float dtype; similarity is the cosine of rows, computed in fp32.
    `relevance`: non-negative quality per token (None: all ones); kernel
    `L = diag(relevance) S diag(relevance)`. `candidates`: bool mask of eligible tokens
    (None: all). Returns indices in greedy selection order; ties go to the lowest index,
    where gains within `reference.dpp.TIE_RTOL * max L_ii` (1e-6, fp32 rounding noise) count
    as ties, so exact duplicate tokens tie on every backend whatever its summation order.
    When no eligible token has a positive gain left (duplicates, rank deficiency,
    D < k), the remaining picks are the eligible unselected tokens by descending
    relevance, ties to the lowest index: always k distinct eligible indices, never NaN.
    Raises ValueError if k exceeds the eligible count of any image.

    `check_values=False` skips the checks that read tensor values (finite, non-negative
    relevance; the eligible count): each is a device synchronisation on a GPU. Callers
    that pass it guarantee them (the kernels stay in bounds either way).
    """
    check_dpp_inputs(features, relevance, k, candidates=candidates, check_values=check_values)
    if features.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.long, device=features.device)
    return _dispatch(
        backend,
        features,
        "dpp",
        "dpp_greedy_map",
        lambda kernel: kernel(features, relevance, k, candidates=candidates),
        lambda: _ref_dpp.dpp_greedy_map(features, relevance, k, candidates=candidates),
    )


def dpp_greedy_map_varlen(
    features: torch.Tensor,
    cu_seqlens: torch.Tensor,
    relevance: torch.Tensor | None,
    k: torch.Tensor | list[int] | tuple[int, ...],
    *,
    candidates: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> list[torch.Tensor]:
    """Varlen `dpp_greedy_map`: images of different token counts packed along dim 0.

    `features` [T, D] (any float dtype); `cu_seqlens` int LongTensor [B+1], non-decreasing,
    `cu_seqlens[0] == 0`, `cu_seqlens[-1] == T` (image b owns rows
    `cu_seqlens[b]:cu_seqlens[b+1]`, as vLLM packs a batch's images); `relevance` [T] | None;
    `k` one budget per image (list or LongTensor [B]); `candidates` bool [T] | None.
    Returns a list of B LongTensors, the b-th of shape [k_b]: *local* indices
    (0 <= i < N_b) in greedy selection order, with exactly the rule of `dpp_greedy_map`
    applied to each image on its own (ties to the lowest index, the same fill rule).
    Raises ValueError if some k_b is < 1 or exceeds image b's eligible count (k_b = 0 is
    allowed for an empty image only).
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2 or not features.is_floating_point():
        raise ValueError(
            f"features must be a float tensor [T, D], got {features.dtype} {tuple(features.shape)}"
        )
    total = features.shape[0]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [B+1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be int32/int64 [B+1], got {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    if (
        bounds[0] != 0
        or bounds[-1] != total
        or any(a > b for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    ):
        raise ValueError(
            f"cu_seqlens must start at 0, end at T={total} and be non-decreasing, got {bounds}"
        )
    bsz = len(bounds) - 1
    if isinstance(k, torch.Tensor):
        if k.dtype.is_floating_point or k.dim() != 1:
            raise ValueError("k must be a 1-D integer tensor [B] or a list of ints")
        k = k.tolist()
    k = list(k)
    if any(isinstance(x, bool) or not isinstance(x, int) for x in k):
        raise TypeError("k must hold ints")
    if len(k) != bsz:
        raise ValueError(f"k has {len(k)} budgets for {bsz} images")
    for name, value in (("relevance", relevance), ("candidates", candidates)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
        if tuple(value.shape) != (total,):
            raise ValueError(f"{name} must have shape [T] = [{total}], got {list(value.shape)}")
        if value.device != features.device:
            raise ValueError(f"{name} is on {value.device}, features on {features.device}")
    if relevance is not None:
        if not relevance.is_floating_point():
            raise ValueError(f"relevance must be a float tensor, got dtype {relevance.dtype}")
        if not torch.isfinite(relevance).all() or (relevance < 0).any():
            raise ValueError("relevance must be finite and non-negative")
    if candidates is not None:
        if candidates.dtype != torch.bool:
            raise ValueError(f"candidates must be a bool tensor, got dtype {candidates.dtype}")
        csum = [0, *candidates.long().cumsum(0).tolist()]
        counts = [csum[bounds[b + 1]] - csum[bounds[b]] for b in range(bsz)]
    else:
        counts = [bounds[b + 1] - bounds[b] for b in range(bsz)]
    for b, (k_b, eligible) in enumerate(zip(k, counts, strict=True)):
        if not (1 <= k_b <= eligible or k_b == 0 == bounds[b + 1] - bounds[b]):
            raise ValueError(
                f"k[{b}]={k_b} must be in [1, {eligible}] (image {b}'s eligible count)"
            )
    return _dispatch(
        backend,
        features,
        "dpp",
        "dpp_greedy_map_varlen",
        lambda kernel: kernel(features, bounds, relevance, k, candidates=candidates),
        lambda: _ref_dpp.dpp_greedy_map_varlen(
            features, cu_seqlens, relevance, k, candidates=candidates
        ),
    )


def bipartite_stats(
    features: torch.Tensor, tau: float, *, backend: Backend = "auto"
) -> BipartiteStats:
    """[B, N, D], tau -> BipartiteStats, each field [B, ceil(N/2)].

    src = even tokens, dst = odd tokens; per src token: degree (#dst with cosine >= tau),
    the sum of those edges, the sum over all dst, the best cosine and its dst index
    (dst-local, ties to the lowest). No similarity matrix is materialised.
    """
    _check_features(features)
    check_tau(tau)
    return _dispatch(
        backend,
        features,
        "bipartite",
        "bipartite_stats",
        lambda kernel: kernel(features, float(tau)),
        lambda: _ref_bipartite.bipartite_stats(features, float(tau)),
    )


def divprune_order(features: torch.Tensor, k: int, *, backend: Backend = "auto") -> torch.Tensor:
    """[B, N, D], k -> LongTensor [B, k]: DivPrune's greedy max-min pick order on `1 - cos`.

    First pick: the token whose nearest other token is farthest; then the unpicked token
    farthest from its nearest pick; ties to the lowest index (see
    `vllm_script.reference.divprune`). Raises ValueError unless 1 <= k <= N.
    """
    _, n, _ = _check_features(features)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, N={n}]")
    if features.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.long, device=features.device)
    return _dispatch(
        backend,
        features,
        "divprune",
        "divprune_order",
        lambda kernel: kernel(features, k),
        lambda: _ref_divprune.divprune_order(features, k),
    )
