"""Selection is deterministic across processes and thread counts (vLLM's workers).

Every TP rank / pipeline stage / node runs the selection itself on the same inputs, so
the kept indices must not depend on the process, on `torch.set_num_threads`, or on a
reduction order: ties go to the lowest index. Each case runs in two fresh Python
processes (1 and 2 threads) and in this one; all must agree exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# B, N, D, k: LLaVA-1.5's 576 tokens, a width the CPU handles fast, and a ragged shape
SHAPES = [(2, 576, 128, 64), (3, 100, 33, 17)]

CHILD = r"""
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_determinism import compute_all
torch.set_num_threads(int(sys.argv[1]))
print("DETERMINISM_RESULT " + json.dumps(compute_all()), flush=True)
"""


def _inputs(b: int, n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish features with near-duplicates, as real patches: ties are likely
    base = torch.randn(b, n // 4 + 1, d, generator=g)
    features = base.repeat_interleave(4, dim=1)[:, :n] + 1e-3 * torch.randn(b, n, d, generator=g)
    relevance = torch.rand(b, n, generator=g)
    return features, relevance


def compute_all() -> dict[str, list]:
    """Every selection under test on fixed inputs -> {case: kept indices}."""
    from vllm_script import ops
    from vllm_script.methods.gsp import gsp_select
    from vllm_script.methods.qcsp import qcsp_select
    from vllm_script.methods.script import script_select

    out: dict[str, list] = {}
    for b, n, d, k in SHAPES:
        features, relevance = _inputs(b, n, d, seed=n + d)
        tag = f"{b}x{n}x{d}k{k}"
        out[f"dpp/{tag}"] = ops.dpp_greedy_map(features, relevance, k, backend="torch").tolist()
        out[f"dpp-norel/{tag}"] = ops.dpp_greedy_map(features, None, k, backend="torch").tolist()
        out[f"script/{tag}"] = script_select(features, relevance, k).keep.tolist()
        out[f"gsp/{tag}"] = gsp_select(features, k).keep.tolist()
        out[f"qcsp/{tag}"] = qcsp_select(features, relevance, k).keep.tolist()
        # bf16 inputs, as the model hands them over
        out[f"script-bf16/{tag}"] = script_select(
            features.bfloat16(), relevance.bfloat16(), k
        ).keep.tolist()
    return out


def _run_child(threads: int) -> dict[str, list]:
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(tests=tests), str(threads)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("DETERMINISM_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"child failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="module")
def results():
    return {"one-thread": _run_child(1), "two-threads": _run_child(2), "here": compute_all()}


def test_selection_identical_across_processes_and_threads(results):
    reference = results["here"]
    assert len(reference) == 6 * len(SHAPES)
    for name, got in results.items():
        assert got.keys() == reference.keys()
        for case in reference:
            assert got[case] == reference[case], f"{case} differs in {name}"


def test_selections_are_valid(results):
    # a sanity check that the comparison above compares real selections
    for case, picks in results["here"].items():
        k = int(case.rsplit("k", 1)[1])
        for row in picks:
            assert len(row) == len(set(row)) == k, case


def test_threads_really_differ_in_child():
    # the two children must really run with different thread counts
    code = (
        "import torch,sys; torch.set_num_threads(int(sys.argv[1])); print(torch.get_num_threads())"
    )
    counts = [
        subprocess.run(
            [sys.executable, "-c", code, str(t)], capture_output=True, text=True, timeout=120
        ).stdout.strip()
        for t in (1, 2)
    ]
    assert counts == ["1", "2"]


def test_dpp_ties_go_to_the_lowest_index():
    from vllm_script import ops

    # all tokens identical, equal relevance: every gain ties -> 0, 1, 2, ...
    features = torch.ones(1, 50, 16)
    picks = ops.dpp_greedy_map(features, torch.ones(1, 50), 10, backend="torch")
    assert picks.tolist() == [list(range(10))]
    # two identical groups: the first pick is the lowest index of the best group
    features = torch.cat([torch.eye(4)[0].expand(5, 4), torch.eye(4)[1].expand(5, 4)])[None]
    picks = ops.dpp_greedy_map(features, None, 2, backend="torch")
    assert picks.tolist() == [[0, 5]]


def test_script_ties_go_to_the_lowest_index():
    from vllm_script.methods.script import script_select

    # all tokens identical: GSP removes the lowest-index src tokens (even positions
    # 0, 2, ..., 18: half of the 20), the DPP then takes the lowest survivors
    features = torch.ones(1, 40, 8)
    keep = script_select(features, torch.ones(1, 40), 6).keep
    assert keep.tolist() == [[1, 3, 5, 7, 9, 11]]
    # no GSP: the DPP alone ties to 0, 1, 2, ...
    keep = script_select(features, torch.ones(1, 40), 6, gsp_ratio=0.0).keep
    assert keep.tolist() == [list(range(6))]
