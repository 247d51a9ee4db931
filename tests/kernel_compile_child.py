"""Child of tests/test_kernel_compile.py: compile every CUDA launch configuration for real.

Runs without TRITON_INTERPRET (the kernels must be real `JITFunction`s). The launchers are
driven on CPU tensors under `record_launches()`, which makes them take their GPU decisions
(tile sizes, dot modes, Gram or rows, graph buckets) and record each launch; every distinct
specialization (what Triton's JIT keys a compiled kernel on: argument types, 16-divisibility
and alignment, constexprs) is then compiled for each target down to cubin.

Prints one JSON object: {"configs": [...], "failures": [...]}.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
from vllm_script.kernels import bipartite as kbip  # noqa: E402
from vllm_script.kernels import divprune as kdiv  # noqa: E402
from vllm_script.kernels import dpp as kdpp  # noqa: E402
from vllm_script.kernels.launch import (  # noqa: E402
    compile_for_target,
    record_launches,
    specialization_key,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (images, tokens per image, feature width): ints equal to 1, divisible by 16 and neither
# specialise differently; grids of one tile, several, and a partial last tile
SHAPES = ((1, 1, 1), (1, 100, 3), (3, 300, 1000), (2, 2880, 4096), (16, 577, 1024))
CAPABILITIES = (80, 90)


def record_all():
    with record_launches() as rec:
        for dtype, (bsz, n, d) in itertools.product(DTYPES, SHAPES):
            flat = torch.zeros(bsz * n, d, dtype=dtype)
            bounds = list(range(0, (bsz + 1) * n, n))
            k = [min(n, 5)] * bsz
            for rel, cand, gram in itertools.product(
                (None, torch.ones(bsz * n)),
                (None, torch.ones(bsz * n, dtype=torch.bool)),
                (True, False),
            ):
                kdpp.dpp_greedy_map_varlen(flat, bounds, rel, k, candidates=cand, materialize=gram)
            # varlen batch of different sizes, split by the Gram budget
            kdpp.dpp_greedy_map_varlen(flat, [0, 1, bsz * n], None, [1, 1])
            batch = flat.view(bsz, n, d)
            kbip.bipartite_stats(batch, 0.2)
            for gram in (True, False):
                kdiv.divprune_order(batch, min(n, 5), materialize=gram)
    return rec.launches


CONFIGS: list[tuple[str, object, tuple, dict, int]] = []  # filled before the workers fork


def compile_one(index: int) -> dict:
    key, kernel, args, kwargs, cc = CONFIGS[index]
    start = time.perf_counter()
    entry = {"kernel": kernel.fn.__name__, "target": f"sm_{cc}", "key": key}
    try:
        compiled = compile_for_target(kernel, args, kwargs, cc)
        assert "cubin" in compiled.asm, "no cubin produced"
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def main() -> None:
    seen: dict[str, tuple] = {}
    for kernel, _grid, args, kwargs in record_all():
        seen.setdefault(specialization_key(kernel, args, kwargs), (kernel, args, kwargs))
    CONFIGS.extend((key, *cfg, cc) for key, cfg in seen.items() for cc in CAPABILITIES)
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        entries = pool.map(compile_one, range(len(CONFIGS)), chunksize=1)
    report = {"configs": entries, "failures": [e for e in entries if "error" in e]}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
