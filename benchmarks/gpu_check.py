"""The GPU check, in one command: kernel tests, kernel benchmarks, a 7B-shaped TTFT projection.

Needs only torch, Triton and transformers (the lent GPU machine has no vLLM and installs
nothing; the project runs from this source tree, not installed). Steps:

1. tests/test_kernels.py, tests/test_contract.py and tests/test_warmup.py on CUDA (the
   `gpu`-marked large-shape tests assert the numerics contract): pytest's report to
   tests_<device>.txt (skipped with a note when pytest is not installed);
2. benchmarks/bench_kernels.py: every implementation side by side (bf16, batches 1 and 16,
   LLaVA-1.5 and LLaVA-NeXT geometries; fp32 rows for the DPP and the bipartite
   statistics): kernels_<device>.csv;
3. benchmarks/bench_ttft_projection.py: vision + prefill of random bf16 LLaVA-1.5-7B
   shapes with each method's selection in place: ttft_projection_<device>.csv;
4. benchmarks/profile_selection.py: host-side vs device time of one call of each op, and
   the profiler's tables (launches, allocations, kernels): profile_<device>.txt.

Results go to benchmarks/results/gpu_<device>/ (or --out). About 3 minutes on an H200.
`--small` is the CPU dry run CI exercises: tiny shapes, one repeat, a few quick tests.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --small --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from vllm_script._source_tree import map_kernels  # noqa: E402

map_kernels()

import bench_kernels  # noqa: E402
import bench_ttft_projection  # noqa: E402
import profile_selection  # noqa: E402

TESTS = ["tests/test_kernels.py", "tests/test_contract.py", "tests/test_warmup.py"]
# the dry run's tests: quick ones that touch the kernels, the contract and the warm-up
SMALL_TESTS = "cosine_tolerance or varlen_validation or every_warmup_step"


def versions() -> str:
    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    for name in ("triton", "transformers", "vllm", "pytest"):
        spec = importlib.util.find_spec(name)
        if spec is None:
            parts.append(f"{name}: not installed")
        else:
            module = __import__(name)
            parts.append(f"{name} {getattr(module, '__version__', '?')}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        parts.append(
            f"{torch.cuda.get_device_name()} sm_{cap[0]}{cap[1]}, CUDA {torch.version.cuda}"
        )
    return ", ".join(parts)


def run_tests(out: Path, small: bool) -> str:
    if importlib.util.find_spec("pytest") is None:
        note = "pytest is not installed here: the tests were not run (carry its wheel)"
        out.write_text(note + "\n")
        return note
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *TESTS]
    if small:
        cmd += ["-k", SMALL_TESTS]
    env = dict(os.environ)
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out.write_text(res.stdout + res.stderr)
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    return f"exit {res.returncode}: {lines[-1] if lines else '(no output)'}"


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU dry run: tiny shapes, 1 repeat")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["tests", "kernels", "projection", "profile"]
    )
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = bench_kernels.device_name(device)
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_{name}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"[gpu-check] {versions()}", flush=True)
    summary = [f"versions: {versions()}"]

    def step(label: str, fn) -> None:
        t0 = time.perf_counter()
        result = fn()
        line = f"{label}: {result} ({time.perf_counter() - t0:.0f} s)"
        print(f"[gpu-check] {line}", flush=True)
        summary.append(line)

    if "tests" not in args.skip:
        step("tests", lambda: run_tests(out / f"tests_{name}.txt", args.small))
    if "kernels" not in args.skip:
        csv_path = out / f"kernels_{name}.csv"
        if args.small:
            kernel_runs = [["--geometries", "llava15", "--dim", "64", "--repeats", "1",
                            "--dpp-tiles", "128x32x32"]]  # fmt: skip
        else:
            # beside the default tiles: the ones before the 2026-11-29 H200 run and another
            # candidate; the lazy twin is the CPU route's (~1 min of GPU time here)
            kernel_runs = [
                ["--batches", "1", "16", "--dtype", "bf16", "--repeats", "10",
                 "--skip-impls", "torch-lazy", "--dpp-tiles", "128x32x32", "64x64x128"],
                ["--ops", "dpp", "bipartite", "--dtype", "fp32", "--repeats", "10", "--append",
                 "--skip-impls", "torch-lazy"],
            ]  # fmt: skip
        step(
            "kernels",
            lambda: [str(bench_kernels.main([*a, "--out", str(csv_path)])) for a in kernel_runs][
                -1
            ],
        )
    if "projection" not in args.skip:
        proj = ["--out", str(out / f"ttft_projection_{name}.csv")]
        if args.small:
            proj += ["--small", "--batches", "1", "2", "--repeats", "1", "--warmup", "1"]
        step("projection", lambda: str(bench_ttft_projection.main(proj)))
    if "profile" not in args.skip:
        prof = ["--out", str(out / f"profile_{name}.txt")] + (["--small"] if args.small else [])
        step("profile", lambda: str(profile_selection.main(prof)))
    summary.append(f"total: {time.perf_counter() - started:.0f} s")
    (out / f"summary_{name}.txt").write_text("\n".join(summary) + "\n")
    print(f"[gpu-check] done in {time.perf_counter() - started:.0f} s; results in {out}")
    return out


if __name__ == "__main__":
    main()
