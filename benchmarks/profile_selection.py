"""Where one selection call spends its time: host-side Python and launches vs the device.

For each op of bench_kernels.py (the same callables: `make_call`; the Triton kernels on a
GPU, the CPU route's implementations on CPU) at one image, bf16 features:
the median host-side time (the call returns: launches queued) and total time (after a
CUDA synchronise) over --repeats calls, then torch.profiler's tables of the same call by
self CPU time (launch and allocation counts) and by device time (which kernels). A call
whose total is close to its host-side time is bound by the host, not by its kernels.

    python benchmarks/profile_selection.py --out results/gpu_<device>/profile_<device>.txt
    python benchmarks/profile_selection.py --small --out /tmp/profile.txt  # CPU dry run
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_kernels import GEOMETRIES, make_call
from torch.profiler import ProfilerActivity, profile

OPS = {
    "cuda": (
        ("dpp", "triton"),
        ("bipartite", "triton"),
        ("divprune", "triton"),
        ("script", "auto"),
    ),
    "cpu": (("dpp", "compiled"), ("bipartite", "torch"), ("divprune", "torch"), ("script", "auto")),
}


def measure(fn, device: torch.device, repeats: int) -> tuple[float, float, str]:
    """-> (median host-side s, median total s, profiler tables) after 3 warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    host, total = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        host.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(5):
            fn()
        sync()
    table = prof.key_averages()
    text = table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60)
    if device.type == "cuda":
        text += table.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60)
    return statistics.median(host), statistics.median(total), text


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU dry run: N=40, D=32, 1 repeat")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = {"tiny": (40, 8)} if args.small else GEOMETRIES
    geometries = ["tiny"] if args.small else ["llava15", "llavanext"]
    d = 32 if args.small else 4096
    repeats = 1 if args.small else args.repeats
    gen = torch.Generator().manual_seed(0)
    summary, details = [], []
    for geo in geometries:
        n, k = sizes[geo]
        feats = torch.randn(1, n, d, generator=gen).bfloat16().to(device)
        rel = torch.rand(1, n, generator=gen).to(device)
        query = [torch.randn(12, d, generator=gen).to(feats)]
        for op, impl in OPS[device.type]:
            host, total, text = measure(make_call(op, impl, feats, rel, k, query), device, repeats)
            line = (
                f"{op} {impl} N={n} K={k} D={d} bf16, 1 image: host-side {host * 1e3:.3f} ms, "
                f"total {total * 1e3:.3f} ms"
            )
            print(line, flush=True)
            summary.append(line)
            details += [f"== {line}", text]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        f"device: {device} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}\n"
        + "\n".join(summary)
        + "\n\n"
        + "\n".join(details)
    )
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
