"""Time the DPP greedy MAP and GSP bipartite backends side by side on the current device.

Backends (DPP): `triton` (vllm_script.kernels.dpp), `twin` (vllm_script.reference.dpp, the
lazy blocked CPU path), `loop` (the authors' way: materialise L = diag(q) S diag(q), then K
steps over whole rows of it: `reference.dpp.dpp_greedy_map_materialized`).
Backends (bipartite): `triton`, `twin`.
Geometries: llava15 (N=576, K=64), llavanext (N=2880, K=320), video (N=16384, K=2048);
D = 4096 (LLaVA-7B hidden size) unless --dim. Inputs: random Gaussian features with
uniform relevance in [0, 1), one image (batch 1), fp32 unless --dtype.

Writes one CSV row per (op, geometry, backend): device, shape, median and p20/p80 wall time
over --repeats timed runs (after one warm-up), peak extra memory (CUDA: allocator peak;
CPU: peak RSS growth, sampled every 0.5 ms), and whether the picks equal the twin's.
On CPU the Triton rows are `skipped` (TRITON_INTERPRET runs kernels in a Python
interpreter: a correctness tool, not a speed).

Quick run on a 2-core CPU (a few minutes):
    python benchmarks/bench_kernels.py --geometries llava15 llavanext --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from vllm_script.reference import bipartite as rbip
from vllm_script.reference import dpp as rdpp

GEOMETRIES = {
    "llava15": (576, 64),
    "llavanext": (2880, 320),
    "video": (16384, 2048),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FIELDS = [
    "device", "op", "geometry", "n", "d", "k", "batch", "dtype", "backend", "status",
    "median_s", "p20_s", "p80_s", "peak_mem_mib", "repeats", "threads", "same_as_twin",
    "note",
]  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


class PeakRSS:
    """Peak resident-set growth of this process while the block runs (Linux /proc)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def time_fn(fn, device: torch.device, repeats: int):
    """-> (result, [seconds], peak extra MiB). One untimed warm-up run first (on CPU only
    when repeats > 1: a single long run, e.g. video, has nothing to compile)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda" or repeats > 1:
        fn()
        sync()
    times, peak = [], 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(repeats):
        if device.type == "cpu":
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            peak = max(peak, mem.mib)
        else:
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out, times, peak


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    ap.add_argument("--ops", nargs="+", default=["dpp", "bipartite"], choices=["dpp", "bipartite"])
    ap.add_argument(
        "--backends", nargs="+", default=["triton", "twin", "loop"],
        choices=["triton", "twin", "loop"],
    )  # fmt: skip
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--video-repeats", type=int, default=1, help="repeats for the video geometry")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument(
        "--loop-max-n", type=int, default=4096,
        help="skip the materialised loop above this N on CPU (N=16384: 1 GiB L, ~1 TFLOP GEMM)",
    )  # fmt: skip
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--note", default="", help="free text copied into every row")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev_name = device_name(device)
    out = args.out or Path(__file__).parent / "results" / f"kernels_{dev_name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out.exists()
    triton_ok = device.type == "cuda"
    if triton_ok:
        from vllm_script.kernels import bipartite as kbip
        from vllm_script.kernels import dpp as kdpp

    rows = []
    for geo in args.geometries:
        n, k = GEOMETRIES[geo]
        d = args.dim
        repeats = args.video_repeats if geo == "video" else args.repeats
        gen = torch.Generator().manual_seed(0)
        feats = torch.randn(1, n, d, generator=gen).to(DTYPES[args.dtype]).to(device)
        rel = torch.rand(1, n, generator=gen).to(device)
        for op in args.ops:
            ref = None
            # the twin first: the other backends' picks are compared with it
            for backend in sorted(args.backends, key=lambda b: b != "twin"):
                if op == "bipartite" and backend == "loop":
                    continue
                row = {
                    "device": dev_name, "op": op, "geometry": geo, "n": n, "d": d,
                    "k": k if op == "dpp" else "", "batch": 1, "dtype": args.dtype,
                    "backend": backend, "repeats": repeats, "threads": torch.get_num_threads(),
                    "note": args.note,
                }  # fmt: skip
                if backend == "triton" and not triton_ok:
                    row["status"] = "skipped: no CUDA (TRITON_INTERPRET is not a speed)"
                elif backend == "loop" and device.type == "cpu" and n > args.loop_max_n:
                    row["status"] = f"skipped: N > --loop-max-n={args.loop_max_n}"
                else:
                    if op == "dpp":
                        impl = {
                            "triton": lambda: kdpp.dpp_greedy_map,
                            "twin": lambda: rdpp.dpp_greedy_map,
                            "loop": lambda: rdpp.dpp_greedy_map_materialized,
                        }[backend]()
                        fn = functools.partial(impl, feats, rel, k)
                    else:
                        impl = kbip.bipartite_stats if backend == "triton" else rbip.bipartite_stats
                        fn = functools.partial(impl, feats, 0.2)
                    res, times, peak = time_fn(fn, device, repeats)
                    key = res if op == "dpp" else res.best_dst
                    if backend == "twin":
                        ref = key
                    row.update(
                        status="ok",
                        median_s=f"{statistics.median(times):.6f}",
                        p20_s=f"{quantile(times, 0.2):.6f}",
                        p80_s=f"{quantile(times, 0.8):.6f}",
                        peak_mem_mib=f"{peak:.1f}",
                        same_as_twin="" if ref is None else str(bool(torch.equal(key, ref))),
                    )
                print(
                    f"{op:9s} {geo:9s} {backend:6s} {row['status']:.40s}  "
                    f"median {row.get('median_s', '-')} s  p20 {row.get('p20_s', '-')}  "
                    f"p80 {row.get('p80_s', '-')}  peak {row.get('peak_mem_mib', '-')} MiB  "
                    f"same_as_twin={row.get('same_as_twin', '')}",
                    flush=True,
                )
                rows.append(row)

    with out.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
