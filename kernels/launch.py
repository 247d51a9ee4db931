"""How the kernels are launched: the GPU-path decision, and a recorder for compile checks.

Every launch in `vllm_script.kernels` goes through `launch(kernel, grid, *args, **kw)`.
`record_launches()` makes the launchers take their CUDA decisions (tile sizes, dot
modes, paths) on CPU tensors and record each launch instead of running it; the
compile test (tests/test_kernel_compile.py) then compiles every recorded configuration
with Triton's real compiler for sm_80 / sm_90, because the interpreter
(`TRITON_INTERPRET=1`) accepts code that the compiler rejects.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("vllm_script")

# CUDA graphs for the step launches ("0" turns them off: one host launch per step).
CUDA_GRAPHS_ENV = "VLLM_SCRIPT_CUDA_GRAPHS"
GRAPH_CACHE_SIZE = 64
STEP_BUCKET = 32  # a graph replays a multiple of this many steps (steps >= k are no-ops)


@dataclass
class Recording:
    """Launches recorded by `record_launches`: (kernel, grid, args, kwargs) each."""

    launches: list[tuple[object, tuple, tuple, dict]] = field(default_factory=list)


_recording: Recording | None = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_path(device: torch.device) -> bool:
    """Take the CUDA decisions (tiles, tensor-core dots, CUDA graphs) for this device?"""
    if _recording is not None:
        return True
    return device.type == "cuda" and not interpreting()


def recording() -> bool:
    return _recording is not None


def host_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 host tensor for a per-call H2D copy: pinned for a CUDA device, so that
    `.to(device, non_blocking=True)` is truly asynchronous (a copy from pageable memory
    synchronises the stream first)."""
    pin = device.type == "cuda" and not recording()
    return torch.tensor(values, dtype=torch.int64, pin_memory=pin)


class KernelError(RuntimeError):
    """A Triton kernel failed to compile or launch; `kernel` names it."""

    def __init__(self, kernel: str, cause: BaseException):
        self.kernel = kernel
        super().__init__(f"Triton kernel {kernel} failed: {type(cause).__name__}: {cause}")


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', repr(fn))}"


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, or record it under `record_launches`. Failures are
    re-raised as `KernelError` naming the kernel."""
    if _recording is not None:
        _recording.launches.append((kernel, tuple(grid), args, kwargs))
        return
    try:
        kernel[grid](*args, **kwargs)
    except Exception as exc:
        raise KernelError(kernel_name(kernel), exc) from exc


@contextmanager
def record_launches() -> Iterator[Recording]:
    """Record instead of launching, with the GPU path's decisions (see module docstring).

    Launchers run on CPU tensors here; what they read back from the device is garbage,
    so they must not branch on kernel outputs (none does).
    """
    global _recording
    previous, _recording = _recording, Recording()
    try:
        yield _recording
    finally:
        _recording = previous


class StepGraphs:
    """CUDA graphs of the K step launches, one per shape bucket, replayed per call.

    A bucket is (device, grid, steps rounded up to STEP_BUCKET, tiles): the launches read
    every per-call address from the descriptor, so a graph captured once serves any later
    call of its bucket after one small host-to-device copy of the descriptor. The first
    call of a bucket runs its steps eagerly (that also compiles the kernel), then captures.
    Any capture failure is logged once and the steps run eagerly from then on.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.graphs: collections.OrderedDict[tuple, tuple[object, torch.Tensor]] = (
            collections.OrderedDict()
        )
        self.disabled = os.environ.get(CUDA_GRAPHS_ENV, "1") == "0"

    def run(self, key: tuple, desc: torch.Tensor, launch_steps) -> None:
        """`desc` (host int64): this call's descriptor; launch_steps(desc_dev) launches all
        steps of the bucket with that device descriptor."""
        entry = self.graphs.get(key)
        if entry is not None:
            graph, desc_dev = entry
            self.graphs.move_to_end(key)
            desc_dev.copy_(desc, non_blocking=True)
            graph.replay()
            return
        # the cached descriptor is rewritten in place by every later call of the bucket:
        # made outside inference mode, so that a bucket first seen under
        # torch.inference_mode() (a model's forward) still serves calls outside it
        with torch.inference_mode(False):
            desc_dev = torch.empty(desc.shape, dtype=desc.dtype, device=key[0])
            desc_dev.copy_(desc, non_blocking=True)
        launch_steps(desc_dev)
        if self.disabled:
            return
        try:
            graph = self._capture(desc_dev, launch_steps)
        except Exception as exc:  # never fatal: fall back to host launches
            logger.warning(
                "vllm-script: CUDA graph capture of the %s steps failed (%s: %s); "
                "launching each step from the host from now on",
                self.name,
                type(exc).__name__,
                exc,
            )
            self.disabled = True
            return
        self.graphs[key] = (graph, desc_dev)
        if len(self.graphs) > GRAPH_CACHE_SIZE:
            self.graphs.popitem(last=False)

    @staticmethod
    def _capture(desc_dev: torch.Tensor, launch_steps):
        stream = torch.cuda.Stream(desc_dev.device)
        stream.wait_stream(torch.cuda.current_stream(desc_dev.device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                launch_steps(desc_dev)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(desc_dev.device).wait_stream(stream)
        return graph


def specialization_key(kernel, args: tuple, kwargs: dict) -> str:
    """What the JIT keys a compiled kernel on (types, alignment/divisibility, constexprs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    _, specialization, options = binder(*args, **kwargs)
    return f"{kernel.fn.__name__}{specialization}{sorted(options.items())}"


def compile_for_target(kernel, args: tuple, kwargs: dict, capability: int):
    """Compile one launch exactly as the JIT would on a GPU of `capability` (e.g. 80, 90),
    down to cubin, without a GPU. Returns Triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)
