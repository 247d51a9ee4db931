"""Every figure README.md and docs/serving.md quote from a run is generated from a result
file in the repository (benchmarks/make_readme_table.py); no engine, no timings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "_make_readme_table", ROOT / "benchmarks" / "make_readme_table.py"
)
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)


@pytest.mark.parametrize("doc", tables.DOCS, ids=lambda p: p.name)
def test_generated_blocks_equal_their_result_files(doc):
    text = doc.read_text()
    found = tables.blocks(text)
    assert found, f"{doc.name} has no generated block"
    for kind, path, body in found:
        assert (ROOT / path).is_file(), f"{doc.name}: {path} is not in the repository"
        assert body == tables.render_block(kind, path), (
            f"{doc.name}: the {kind} table from {path} is stale or edited by hand; "
            "run benchmarks/make_readme_table.py"
        )


def test_the_documents_generate_what_they_show():
    readme = {(kind, path) for kind, path, _ in tables.blocks((ROOT / "README.md").read_text())}
    assert ("demo", "benchmarks/results/demo_cpu-2c.csv") in readme
    assert ("serving", "benchmarks/results/serving_cpu-2c.csv") in readme
    assert ("serving", "benchmarks/results/serving_cpu-2c-llava-next.csv") in readme
    serving = tables.blocks((ROOT / "docs" / "serving.md").read_text())
    assert ("server-load", "benchmarks/results/server_load.csv") in {(k, p) for k, p, _ in serving}


def test_regenerate_replaces_bodies_only():
    text = (
        "intro\n<!-- generated: demo a.csv -->\nold\nold\n<!-- generated: end -->\n"
        "middle\n<!-- generated: serving b.csv -->\n<!-- generated: end -->\noutro\n"
    )
    out = tables.regenerate(text, lambda kind, path: f"{kind} from {path}\n")
    assert out == (
        "intro\n<!-- generated: demo a.csv -->\ndemo from a.csv\n<!-- generated: end -->\n"
        "middle\n<!-- generated: serving b.csv -->\nserving from b.csv\n"
        "<!-- generated: end -->\noutro\n"
    )
    assert tables.regenerate(out, lambda kind, path: f"{kind} from {path}\n") == out
    with pytest.raises(ValueError, match="unknown generated-block kind"):
        tables.render_block("nonsense", "a.csv")


def test_demo_table_is_what_the_demo_prints(tmp_path):
    from vllm_script.demo import CSV_COLUMNS, format_table, read_rows

    rows = [
        {"setting": "off", "method": "none", "budget": 576, "image_tokens": 576,
         "prompt_tokens": 586, "ttft_median_ms": 300.0, "ttft_speedup": 1.0},
        {"setting": "on", "method": "script", "budget": 64, "image_tokens": 64,
         "prompt_tokens": 74, "ttft_median_ms": 75.0, "ttft_speedup": 4.0},
    ]  # fmt: skip
    path = tmp_path / "demo.csv"
    with open(path, "w") as f:
        f.write(",".join(CSV_COLUMNS) + "\n")
        for row in rows:
            f.write(",".join(str(row.get(c, "")) for c in CSV_COLUMNS) + "\n")
    lines = format_table(read_rows(path)).splitlines()
    assert lines[1].split()[-2:] == ["576", "64"]
    assert lines[2].split()[-2:] == ["586", "74"]
    assert lines[3].split()[-2:] == ["300.0", "75.0"]
    assert lines[4] == "[demo] TTFT speed-up 4.00x with {'method': 'script', 'budget': 64}"
