"""bench_script_shared_gram.py's comparison on synthetic captured inputs (no engine, no
timings checked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SETTINGS = {"tau": 0.2, "gamma": 1.0, "theta": 0.5, "gsp_ratio": 0.5, "reference": "paper"}


@pytest.fixture
def bench(monkeypatch):
    pytest.importorskip("numba")  # the shared Gram is the compiled CPU path's
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_script_shared_gram

    yield bench_script_shared_gram
    sys.modules.pop("bench_script_shared_gram", None)


def test_compare_rows_on_redundant_features(bench):
    g = torch.Generator().manual_seed(3)
    captured = []
    for n, k in ((97, 12), (64, 64)):
        base = torch.randn(1, n // 3 + 1, 48, generator=g)
        feats = base.repeat_interleave(3, 1)[:, :n] + 0.3 * torch.randn(1, n, 48, generator=g)
        captured.append(
            {"features": feats, "relevance": torch.rand(1, n, generator=g), "k": k,
             "settings": SETTINGS}
        )  # fmt: skip
    rows = bench.compare(captured, repeats=2)
    assert [(r["image"], r["n"], r["k"]) for r in rows] == [(0, 97, 12), (1, 64, 64)]
    for row in rows:
        # random features: no gain within fp32 rounding of a tie, so the same order
        assert row["same_order"] and row["same_set"] and row["first_differing_step"] == ""
        assert row["contract_violations_shared"] == row["contract_violations_unshared"] == 0
        assert float(row["shared_median_s"]) > 0 and float(row["unshared_median_s"]) > 0
