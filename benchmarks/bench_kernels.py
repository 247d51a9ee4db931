"""Time the selection primitives side by side, every implementation in one run, one device.

Ops and implementations (rows of the CSV):

| op | implementation | what |
|---|---|---|
| dpp | `triton` | vllm_script.kernels.dpp; on CUDA the K step launches replay from a CUDA graph |
| dpp | `triton-eager` | the same kernels, one host launch per step (graphs off): the launch floor |
| dpp | `compiled` | the CPU path: numba lazy greedy (vllm_script.reference.dpp_cpu) |
| dpp | `torch-lazy` | the PyTorch twin's lazy blocked queue (reference.dpp.dpp_greedy_map_lazy) |
| dpp | `torch-loop` | the authors' way: materialise L, then K steps over its rows (reference) |
| dpp | `triton-tiles-NxTxD` | `triton` with other GPU tiles (--dpp-tiles N x T x D blocks) |
| dpp-step | `triton`, `triton-eager` | per greedy step: (t(K) - t(1)) / (K - 1) of the rows above |
| bipartite | `triton`, `torch` | GSP's bipartite statistics |
| divprune | `triton`, `torch` | DivPrune's pick order |
| script | `auto` | Script's selection as the plugin runs it: relevance + GSP + DPP + gather |
| script | `unshared` | the same, GSP and DPP apart (CPU: the DPP recomputes GSP's dots) |

Geometries: llava15 (N=576, K=64), llavanext (N=2880, K=320), video (N=16384, K=2048);
D = 4096 (LLaVA-7B) unless --dim; batch sizes --batches (images per call); random
Gaussian features, relevance uniform in [0, 1). Columns: median / p20 / p80 seconds over
--repeats timed runs after one warm-up, peak extra memory (CUDA allocator peak, CPU RSS
growth), threads, and `agree`: leading picks equal to `torch-loop`'s on the same inputs
and device (script `unshared`: to `auto`'s; all of them on CPU, up to a gain within fp32
rounding of a tie; on a GPU up to the first near tie, see the README's numerics
contract). Triton rows on CPU say `skipped` (the interpreter is not a speed).

Writes results/kernels_<device>.csv (replaced; --append to add rows).

    python benchmarks/bench_kernels.py --geometries llava15 llavanext --dim 1024 --threads 1
    python benchmarks/bench_kernels.py --batches 1 16 --dtype bf16    # on a GPU
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from vllm_script.cpu_threads import selection_threads
from vllm_script.methods import apply_selection, script_select
from vllm_script.reference import bipartite as rbip
from vllm_script.reference import divprune as rdiv
from vllm_script.reference import dpp as rdpp
from vllm_script.reference import dpp_cpu
from vllm_script.relevance import llm_relevance

GEOMETRIES = {
    "llava15": (576, 64),
    "llavanext": (2880, 320),
    "video": (16384, 2048),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("dpp", "bipartite", "divprune", "script")
FIELDS = [
    "device", "op", "geometry", "n", "d", "k", "batch", "dtype", "backend", "status",
    "median_s", "p20_s", "p80_s", "peak_mem_mib", "repeats", "threads", "agree", "note",
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
    """-> (result, [seconds], peak extra MiB), after one untimed warm-up run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times, peak = [], 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out = None
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


def leading_agreement(got: torch.Tensor, want: torch.Tensor) -> int:
    """Smallest, over the images, number of leading picks equal in the two [B, K] tensors."""
    same = (got.cpu() == want.cpu()).int().cumprod(dim=1)
    return int(same.sum(dim=1).min())


def _graphs(enabled: bool):
    """Turn the CUDA graphs of the step kernels on or off (fresh caches each time)."""
    from vllm_script.kernels import divprune as kdiv
    from vllm_script.kernels import dpp as kdpp
    from vllm_script.kernels.launch import StepGraphs

    for module, name in ((kdpp, "DPP"), (kdiv, "DivPrune")):
        module._GRAPHS = StepGraphs(name)
        module._GRAPHS.disabled = not enabled


def implementations(op: str, device: torch.device, tiles: list[str] = ()) -> list[str]:
    if op == "dpp":
        names = ["torch-loop", "triton", "triton-eager", "torch-lazy"]
        names += [f"triton-tiles-{spec}" for spec in tiles]
        return names + (["compiled"] if device.type == "cpu" else [])
    if op in ("bipartite", "divprune"):
        return ["torch", "triton"]
    # the shared Gram exists on the compiled CPU path only
    return ["auto"] + (["unshared"] if device.type == "cpu" else [])


def _with_tiles(spec: str, feats, rel, k):
    """The DPP kernel with its GPU step tiles replaced by `spec` = BLOCK_N x BLOCK_T x
    BLOCK_D (the Gram tiles kept) for the duration of each call."""
    from vllm_script.kernels import dpp as kdpp

    block_n, block_t, block_d = (int(v) for v in spec.split("x"))
    default = kdpp._blocks

    def tiles(max_n, d, device):
        return (block_n, block_t, block_d) + default(max_n, d, device)[3:]

    def call():
        kdpp._blocks = tiles
        try:
            return kdpp.dpp_greedy_map(feats, rel, k)
        finally:
            kdpp._blocks = default

    return call


def make_call(op, impl, feats, rel, k, query):
    """The timed callable for one row."""
    if op == "dpp":
        if impl.startswith("triton-tiles-"):
            return _with_tiles(impl.removeprefix("triton-tiles-"), feats, rel, k)
        if impl.startswith("triton"):
            from vllm_script.kernels import dpp as kdpp

            return lambda: kdpp.dpp_greedy_map(feats, rel, k)
        return {
            "torch-loop": lambda: rdpp.dpp_greedy_map_materialized(feats, rel, k),
            "torch-lazy": lambda: rdpp.dpp_greedy_map_lazy(feats, rel, k),
            "compiled": lambda: rdpp.dpp_greedy_map_compiled(feats, rel, k),
        }[impl]
    if op == "bipartite":
        if impl == "triton":
            from vllm_script.kernels import bipartite as kbip

            return lambda: kbip.bipartite_stats(feats, 0.2)
        return lambda: rbip.bipartite_stats(feats, 0.2)
    if op == "divprune":
        if impl == "triton":
            from vllm_script.kernels import divprune as kdiv

            return lambda: kdiv.divprune_order(feats, k)
        return lambda: rdiv.divprune_order(feats, k)

    def script():
        # as vllm_script.pruning runs it: its thread count, fp32 once on CPU, relevance,
        # selection, gather
        with selection_threads(feats.device):
            tokens = feats.float() if feats.device.type == "cpu" else feats
            relevance = llm_relevance(tokens, query)
            selection = script_select(tokens, relevance, k, shared_gram=impl == "auto")
            return apply_selection(feats, selection), selection.info["order"]

    return script


def run_row(args, op, impl, geo, n, k, d, bsz, device, dev_name, ref):
    row = {
        "device": dev_name, "op": op, "geometry": geo, "n": n, "d": d, "k": k, "batch": bsz,
        "dtype": args.dtype, "backend": impl, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "note": args.note,
    }  # fmt: skip
    if impl in args.skip_impls:
        row["status"] = "skipped: --skip-impls"
        return row, None
    if impl.startswith("triton") and device.type != "cuda":
        row["status"] = "skipped: no CUDA (TRITON_INTERPRET is not a speed)"
        return row, None
    if impl == "triton-eager" and op != "dpp":
        row["status"] = "skipped"
        return row, None
    if impl == "torch-loop" and device.type == "cpu" and n > args.loop_max_n:
        row["status"] = f"skipped: N > --loop-max-n={args.loop_max_n}"
        return row, None
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(bsz, n, d, generator=gen).to(DTYPES[args.dtype]).to(device)
    rel = torch.rand(bsz, n, generator=gen).to(device)
    query = [torch.randn(12, d, generator=gen).to(feats) for _ in range(bsz)]
    if device.type == "cuda":
        _graphs(impl != "triton-eager")
    repeats = args.video_repeats if geo == "video" else args.repeats
    row["repeats"] = repeats
    result, times, peak = time_fn(make_call(op, impl, feats, rel, k, query), device, repeats)
    picks = {
        "dpp": lambda: result,
        "divprune": lambda: result,
        "bipartite": lambda: result.best_dst,
        "script": lambda: result[1],
    }[op]()
    row.update(
        status="ok",
        median_s=f"{statistics.median(times):.6f}",
        p20_s=f"{quantile(times, 0.2):.6f}",
        p80_s=f"{quantile(times, 0.8):.6f}",
        peak_mem_mib=f"{peak:.1f}",
        agree="" if ref is None else str(leading_agreement(picks, ref)),
    )
    return row, picks


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--geometries", nargs="+", default=["llava15", "llavanext"], choices=list(GEOMETRIES)
    )
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument(
        "--dpp-tiles", nargs="*", default=[], metavar="NxTxD",
        help="extra DPP rows with these GPU step tiles (BLOCK_N x BLOCK_T x BLOCK_D)",
    )  # fmt: skip
    ap.add_argument("--skip-impls", nargs="*", default=[], help="implementations to leave out")
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--video-repeats", type=int, default=1, help="repeats for the video geometry")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument(
        "--loop-max-n", type=int, default=4096,
        help="skip torch-loop above this N on CPU (N=16384: 1 GiB L, ~1 TFLOP GEMM)",
    )  # fmt: skip
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--append", action="store_true", help="add rows to an existing CSV")
    ap.add_argument("--note", default="", help="free text copied into every row")
    args = ap.parse_args(argv)

    for spec in args.dpp_tiles:
        parts = spec.split("x")
        if (
            len(parts) != 3
            or not all(v.isdigit() and int(v) >= 16 for v in parts)
            or any(int(v) & (int(v) - 1) for v in parts)
        ):
            ap.error(f"--dpp-tiles {spec!r}: expected NxTxD, powers of two >= 16 (e.g. 32x64x128)")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev_name = device_name(device)
    out = args.out or Path(__file__).parent / "results" / f"kernels_{dev_name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu" and not dpp_cpu.available():
        print("numba is not available: the `compiled` rows are skipped")
    rows = []
    for geo in args.geometries:
        n, k = GEOMETRIES[geo]
        for bsz in args.batches:
            for op in args.ops:
                ref = None
                step_rows = []
                for impl in implementations(op, device, args.dpp_tiles):
                    if impl == "compiled" and not dpp_cpu.available():
                        continue
                    row, picks = run_row(
                        args, op, impl, geo, n, k, args.dim, bsz, device, dev_name, ref
                    )
                    if impl in ("torch-loop", "torch", "auto") and picks is not None:
                        ref = picks  # script: `unshared` against `auto`
                    rows.append(row)
                    print_row(row)
                    if op == "dpp" and impl.startswith("triton") and row["status"] == "ok":
                        # the per-step cost: the same call with K = 1
                        one, _ = run_row(
                            args, op, impl, geo, n, 1, args.dim, bsz, device, dev_name, None
                        )
                        per_step = (float(row["median_s"]) - float(one["median_s"])) / (k - 1)
                        step_rows.append(
                            {
                                **row,
                                "op": "dpp-step",
                                "status": "ok",
                                "median_s": f"{per_step:.7f}",
                                "p20_s": "",
                                "p80_s": "",
                                "peak_mem_mib": "",
                                "agree": "",
                            }  # fmt: skip
                        )
                for step_row in step_rows:
                    rows.append(step_row)
                    print_row(step_row)
    with out.open("a" if args.append and out.exists() else "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if not (args.append and fh.tell()):
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    return out


def print_row(row: dict) -> None:
    print(
        f"{row['op']:9s} {row['geometry']:9s} B={row['batch']:<3} {row['backend']:12s} "
        f"{row['status']:.40s}  median {row.get('median_s', '-')} s  "
        f"p20 {row.get('p20_s', '-')}  p80 {row.get('p80_s', '-')}  "
        f"peak {row.get('peak_mem_mib', '-')} MiB  agree={row.get('agree', '')}",
        flush=True,
    )


if __name__ == "__main__":
    main()
