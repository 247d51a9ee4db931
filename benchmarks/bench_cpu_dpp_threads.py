"""The compiled CPU DPP on the serving model's own features: 1 thread vs 2, and the worker.

    .venv/bin/python benchmarks/bench_cpu_dpp_threads.py            # LLaVA-NeXT (~2 min)
    .venv/bin/python benchmarks/bench_cpu_dpp_threads.py --geometry llava15

Starts the serving benchmark's engine (`bench_serving.py`'s model and requests), sends
`--requests` Script requests and, in the worker, records the selection's inputs
(`vllm_script.pruning.script_select`'s features, relevance and settings) and the threads
the worker may use (CPU affinity, OMP_NUM_THREADS, torch's count). Then, in this process,
for each captured image: GSP's survivors as Script computes them, and the compiled
greedy DPP on them (`reference.dpp.dpp_greedy_map_compiled`) with torch at 1 and at 2
threads, side by side (median of --repeats), picks compared. Random features
(bench_kernels.py) leave the top of the lazy heap uncrowded; these do not.

Writes benchmarks/results/cpu_dpp_threads_<machine>.csv: one row per image and thread
count, the worker's facts repeated in each row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import bench_serving as bs

RESULTS_DIR = Path(__file__).parent / "results"


def _capture(worker, out: str) -> dict:
    """In the worker: record every Script selection's inputs to `out`; the worker's threads."""
    import torch

    from vllm_script import pruning

    original = pruning.script_select
    dumps = []

    def recording(features, relevance, k, **settings):
        dumps.append({"features": features.clone(), "relevance": relevance.clone(), "k": k,
                      "settings": settings})  # fmt: skip
        torch.save(dumps, out)
        return original(features, relevance, k, **settings)

    pruning.script_select = recording
    return {
        "worker_affinity": " ".join(map(str, sorted(os.sched_getaffinity(0)))),
        "worker_omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "worker_torch_threads": torch.get_num_threads(),
    }


def capture_script_inputs(geometry: str, requests: int) -> tuple[list[dict], dict]:
    """Serve `requests` Script requests on the serving benchmark's engine at `geometry`;
    returns the selection inputs the worker saw (one dict per image: features, relevance,
    k, settings) and the worker's threads. The engine is shut down before returning."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with functions
    import torch
    from vllm import LLM, SamplingParams

    from vllm_script.testing import write_tiny_llava, write_tiny_llava_next

    side, budgets, max_len = bs.GEOMETRIES[geometry]
    model_dir = Path(tempfile.gettempdir()) / f"vllm-script-bench-{geometry}"
    if geometry == "llava15":
        model_dir = write_tiny_llava(model_dir, **bs.MODEL)
    else:
        model_dir = write_tiny_llava_next(
            model_dir, image_size=336, grid_pinpoints=bs.NEXT_PINPOINTS, **bs.MODEL
        )
    dump = Path(tempfile.mkdtemp()) / "script_inputs.pt"
    llm = LLM(
        model=str(model_dir),
        max_model_len=max_len,
        hf_overrides={"script": {"method": "script", "budget": 64}},
        enable_prefix_caching=False,
        enforce_eager=True,
        seed=0,
        limit_mm_per_prompt={"image": 1},
        kv_cache_memory_bytes=2**30,
    )
    worker = llm.collective_rpc(_capture, args=(str(dump),))[0]
    maker = bs._Requests(side=side)
    one = SamplingParams(max_tokens=1, temperature=0)
    for i in range(requests):
        bs.closed_loop(llm, [maker.make(("script", budgets[-1]), question=i)], 1, one)
    llm.llm_engine.engine_core.shutdown()  # its processes must not share the cores below
    del llm
    print(f"[bench] this process may run on cores {sorted(os.sched_getaffinity(0))}")
    return torch.load(dump), worker


def capture_parser(description: str, requests: int) -> argparse.ArgumentParser:
    """The options of a benchmark on captured Script inputs: geometry, images, repeats, out."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--geometry", default="llava-next", choices=list(bs.GEOMETRIES))
    ap.add_argument("--requests", type=int, default=requests, help="images captured")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    return ap


def main() -> None:
    args = capture_parser(__doc__, requests=3).parse_args()
    captured, worker = capture_script_inputs(args.geometry, args.requests)
    import torch

    from vllm_script.methods.gsp import gsp_candidates
    from vllm_script.methods.qcsp import dpp_quality
    from vllm_script.reference import dpp as rdpp

    machine, _ = bs.machine_label()
    rows = []
    for image, item in enumerate(captured):
        feats, k, settings = item["features"], item["k"], item["settings"]
        survivors = gsp_candidates(
            feats, k, tau=settings["tau"], gamma=settings["gamma"], ratio=settings["gsp_ratio"]
        )
        quality = dpp_quality(item["relevance"], settings["theta"])
        picks = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)  # the compiled DPP refreshes on torch's count

            def call(feats=feats, quality=quality, k=k, survivors=survivors):
                return rdpp.dpp_greedy_map_compiled(feats, quality, k, candidates=survivors)

            picks[threads] = call()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            rows.append({
                "machine": machine, "geometry": args.geometry, "image": image,
                "n": feats.shape[1], "d": feats.shape[2], "k": k,
                "gsp_survivors": int(survivors.sum()), "threads": threads,
                "dpp_median_s": f"{statistics.median(times):.6f}",
                "same_picks_as_1_thread": bool(torch.equal(picks[threads], picks[1])),
                **worker,
            })  # fmt: skip
            print(rows[-1])
    out = Path(args.out) if args.out else RESULTS_DIR / f"cpu_dpp_threads_{machine}.csv"
    bs.write_csv(rows, out, list(rows[0]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
