"""The GPU check's CPU dry run (`python benchmarks/gpu_check.py --small`) keeps working:
every step runs and writes the files the GPU run writes, with the rows it promises."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_gpu_check_dry_run(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--small",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    device = next(tmp_path.glob("summary_*.txt")).stem.removeprefix("summary_")
    summary = (tmp_path / f"summary_{device}.txt").read_text()
    assert "tests: exit 0" in summary, summary

    kernels = _rows(tmp_path / f"kernels_{device}.csv")
    by_key = {(r["op"], r["backend"]): r for r in kernels}
    for key in [("dpp", "torch-loop"), ("dpp", "torch-lazy"), ("bipartite", "torch"),
                ("divprune", "torch"), ("script", "auto")]:  # fmt: skip
        assert by_key[key]["status"] == "ok" and float(by_key[key]["median_s"]) > 0, key
    assert by_key[("dpp", "triton")]["status"].startswith("skipped: no CUDA")
    # every CPU implementation picks exactly the reference's tokens
    assert by_key[("dpp", "torch-lazy")]["agree"] == "64"

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_readme_table

    for render, name in ((make_readme_table.render_kernels, "kernels"),
                         (make_readme_table.render_ttft, "ttft_projection")):  # fmt: skip
        table = render(tmp_path / f"{name}_{device}.csv")
        assert table.count("\n|") >= 3, table  # header, rule and rows

    profile = (tmp_path / f"profile_{device}.txt").read_text()
    for op in ("dpp", "bipartite", "divprune", "script"):
        assert f"\n{op} " in profile and f"== {op} " in profile, op
    assert "Self CPU time total" in profile

    projection = _rows(tmp_path / f"ttft_projection_{device}.csv")
    seen = {(r["geometry"], r["batch"], r["method"]) for r in projection}
    assert seen == {
        (g, b, m)
        for g in ("llava15", "llavanext")
        for b in ("1", "2")
        for m in ("script", "qcsp", "gsp", "divprune", "uniform")
    }
    for r in projection:
        on, ideal, off = float(r["ttft_on_ms"]), float(r["ttft_ideal_ms"]), float(r["ttft_off_ms"])
        assert on >= ideal > 0 and off > 0
        assert abs(float(r["speedup"]) - off / on) < 1e-2
        assert abs(float(r["pct_of_ideal"]) - 100 * ideal / on) < 0.1
