"""The serving benchmark's pure helpers and the README table; no engine, no timings."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("bench_serving")
table = _load("make_readme_table")


def test_kv_blocks_and_concurrency():
    assert [bench.kv_blocks(p, 128) for p in (1, 74, 128, 129, 586)] == [1, 1, 1, 2, 5]
    assert bench.kv_blocks(586, 16) == 37
    assert bench.max_concurrent(512, 5) == 102  # floor, not round
    assert bench.max_concurrent(512, 1) == 512
    with pytest.raises(ValueError):
        bench.kv_blocks(10, 0)


def test_ideal_speedups():
    assert bench.ideal_speedup(586, 74) == pytest.approx(586 / 74)
    # no fixed cost: the adjusted ideal is the token ratio
    assert bench.adjusted_ideal_speedup(0.3, 0.0, 586, 74) == pytest.approx(586 / 74)
    # everything fixed: no speed-up possible
    assert bench.adjusted_ideal_speedup(0.3, 0.3, 586, 74) == pytest.approx(1.0)
    # 100 ms fixed of 300 ms: 300 / (100 + 200 * 74 / 586)
    assert bench.adjusted_ideal_speedup(0.3, 0.1, 586, 74) == pytest.approx(
        0.3 / (0.1 + 0.2 * 74 / 586)
    )
    # a measured vision time above TTFT is clamped, not a negative speed-up
    assert bench.adjusted_ideal_speedup(0.3, 0.5, 586, 74) == pytest.approx(1.0)


def test_percentile():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert bench.percentile(values, 50) == 3.0
    assert bench.percentile(values, 90) == pytest.approx(4.6)
    assert bench.percentile(values, 100) == 5.0
    assert math.isnan(bench.percentile([], 90))


def _rows(first_unpruned: bool = True):
    off, on = ("none", 0), ("script", 64)
    return bench.build_rows(
        [off, on] if first_unpruned else [on, off],
        prompt_tokens={off: 586, on: 74},
        ttfts={off: [0.30, 0.32, 0.34], on: [0.09, 0.10, 0.20]},
        throughput={off: (32, 16.0), on: (32, 4.0)},
        vision_s=0.02,
        embed_s={off: 0.02, on: 0.025},
        prune_s={on: 0.001},
        num_image_tokens=576,
        block_size=128,
        cache_blocks=512,
        cache_gib=2.0,
        concurrency=8,
        output_tokens=16,
        machine="cpu-2c",
        machine_desc="test machine",
        model="tiny test model",
    )


def test_build_rows():
    rows = _rows()
    assert [set(r) for r in rows] == [set(bench.CSV_COLUMNS)] * 2
    off, on = rows
    assert (off["image_tokens"], on["image_tokens"]) == (576, 64)
    assert (off["kv_blocks_per_request"], on["kv_blocks_per_request"]) == (5, 1)
    assert (off["max_concurrent_requests"], on["max_concurrent_requests"]) == (102, 512)
    assert on["max_concurrent_bs16"] == (512 * 128 // 16) // 5  # 74 tokens: 5 blocks of 16
    assert on["ttft_speedup"] == pytest.approx(0.32 / 0.10, abs=1e-3)  # medians
    assert on["ttft_p90_ms"] == pytest.approx(180.0)
    assert on["ideal_speedup"] == pytest.approx(586 / 74, abs=1e-3)
    adjusted = 0.32 / (0.02 + 0.30 * 74 / 586)
    assert on["adjusted_ideal_speedup"] == pytest.approx(adjusted, abs=1e-3)
    assert on["achieved_share"] == pytest.approx(3.2 / adjusted, abs=2e-3)
    assert on["throughput_speedup"] == pytest.approx(4.0)
    assert on["prune_pct_ttft"] == pytest.approx(1.0)
    assert off["ttft_speedup"] == off["ideal_speedup"] == off["achieved_share"] == 1.0
    with pytest.raises(ValueError):
        _rows(first_unpruned=False)


def test_readme_table_from_csv(tmp_path):
    rows = _rows()
    path = tmp_path / "serving_cpu-2c.csv"
    bench.write_csv(rows, path)
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == bench.CSV_COLUMNS
    md = table.render_table(table.read_rows(path))
    lines = md.splitlines()
    assert "test machine" in lines[0] and "tiny test model" in lines[0]
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == [h for _, h, _ in table.TABLE]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:]]
    assert len(body) == 2
    assert body[0][0] == "none (unpruned)" and body[1][:3] == ["script", "64", "74"]
    col = {h: i for i, (_, h, _) in enumerate(table.TABLE)}
    assert body[1][col["TTFT speed-up"]] == "3.20"
    assert body[1][col["ideal (tokens)"]] == "7.92"
    assert body[1][col["max concurrent reqs"]] == "512"


def test_readme_table_rejects_incomplete_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("method,budget\nnone,576\n")
    with pytest.raises(ValueError, match="missing columns"):
        table.read_rows(path)
