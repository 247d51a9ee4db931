"""Script on CPU with and without its shared Gram, on the serving model's own features.

    .venv/bin/python benchmarks/bench_script_shared_gram.py            # LLaVA-NeXT (~2 min)
    .venv/bin/python benchmarks/bench_script_shared_gram.py --geometry llava15

Captures Script's inputs in the serving benchmark's worker (as bench_cpu_dpp_threads.py
does), then, in this process on one thread, for each image: `script_select` as the
plugin runs it (`auto`: the DPP reads the even x odd dots of GSP's GEMM) and with
`shared_gram=False` (GSP and the DPP apart: the DPP recomputes those dots), alternated
call by call (medians of --repeats each). Picks compared: the first step where the two
greedy orders differ, the float64 gains of the two tokens there (relative to max L_ii:
a gap below the tie window TIE_RTOL = 1e-6 is fp32 rounding), and the numerics
contract's violations of each order (`reference.contract.greedy_violations`).

Writes benchmarks/results/script_shared_gram_<machine>_<geometry>.csv, one row per image.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import bench_serving as bs
from bench_cpu_dpp_threads import capture_parser, capture_script_inputs

RESULTS_DIR = Path(__file__).parent / "results"


def compare(captured: list[dict], repeats: int) -> list[dict]:
    """Captured Script inputs (features [1, N, D], relevance [1, N], k, settings per image)
    -> one row per image: both medians, their ratio, how the two orders compare."""

    from vllm_script.methods.gsp import gsp_candidates
    from vllm_script.methods.qcsp import dpp_quality
    from vllm_script.methods.script import script_select
    from vllm_script.reference import contract

    rows = []
    for image, item in enumerate(captured):
        feats, relevance, k = item["features"], item["relevance"], item["k"]
        settings = item["settings"]

        def select(shared: bool, item=item):
            return script_select(
                item["features"], item["relevance"], item["k"], **item["settings"],
                shared_gram=shared,
            )  # fmt: skip

        modes = {"shared": True, "unshared": False}
        orders = {mode: select(shared).info["order"][0] for mode, shared in modes.items()}
        times = {mode: [] for mode in modes}
        for _ in range(repeats):
            for mode, shared in modes.items():
                t0 = time.perf_counter()
                select(shared)
                times[mode].append(time.perf_counter() - t0)
        quality = dpp_quality(relevance, settings["theta"])[0]
        f = feats[0]
        shared, unshared = orders["shared"].tolist(), orders["unshared"].tolist()
        differ = [t for t, (a, b) in enumerate(zip(shared, unshared, strict=True)) if a != b]
        gap = ""
        if differ:
            gains, diag = contract.greedy_gains(f, quality, unshared)
            g = gains[differ[0]]
            gap = f"{float(g[shared[differ[0]]] - g[unshared[differ[0]]]) / float(diag.max()):.3g}"
        # the DPP's eligible tokens (both paths compute the same statistics)
        survivors = gsp_candidates(
            feats, k, tau=settings["tau"], gamma=settings["gamma"], ratio=settings["gsp_ratio"]
        )[0]
        med = {mode: statistics.median(ts) for mode, ts in times.items()}
        rows.append({
            "image": image,
            "n": f.shape[0], "d": f.shape[1], "k": k,
            "shared_median_s": f"{med['shared']:.6f}",
            "unshared_median_s": f"{med['unshared']:.6f}",
            "shared_over_unshared": f"{med['shared'] / med['unshared']:.3f}",
            "same_order": not differ,
            "same_set": sorted(shared) == sorted(unshared),
            "first_differing_step": differ[0] if differ else "",
            "gain_gap_there_x_max_L": gap,
            "contract_violations_shared": len(
                contract.greedy_violations(f, quality, shared, survivors)),
            "contract_violations_unshared": len(
                contract.greedy_violations(f, quality, unshared, survivors)),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = capture_parser(__doc__, requests=6).parse_args()
    captured, _ = capture_script_inputs(args.geometry, args.requests)
    import torch

    torch.set_num_threads(1)  # as in vLLM's CPU worker here (bench_cpu_dpp_threads.py)
    machine, _ = bs.machine_label()
    rows = [
        {"machine": machine, "geometry": args.geometry, **row}
        for row in compare(captured, args.repeats)
    ]
    name = f"script_shared_gram_{machine}_{args.geometry}.csv"
    out = Path(args.out) if args.out else RESULTS_DIR / name
    bs.write_csv(rows, out, list(rows[0]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
