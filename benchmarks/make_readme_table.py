"""Write the tables of README.md and docs/serving.md from the result files they name.

    .venv/bin/python benchmarks/make_readme_table.py            # rewrite every table
    .venv/bin/python benchmarks/make_readme_table.py --check    # exit 1 if one is stale
    .venv/bin/python benchmarks/make_readme_table.py CSV --print  # one serving table

Every figure those documents quote from a run sits in a generated block:

    <!-- generated: KIND PATH -->
    ...
    <!-- generated: end -->

PATH is a result file in this repository and KIND how it is rendered: `serving`
(benchmarks/bench_serving.py's CSV), `demo` (`python -m vllm_script.demo --out`),
`server-load` (tests/test_server_load.py's CSV), `kernels` (benchmarks/bench_kernels.py's
CSV), `ttft` (benchmarks/bench_ttft_projection.py's CSV). A new result file (another machine,
another geometry) gets its own block: add the two marker lines and run this script.
tests/test_docs_tables.py fails while a block differs from its file.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "serving.md", ROOT / "benchmarks" / "README.md"]
BLOCK = re.compile(r"<!-- generated: (\S+) (\S+) -->\n(.*?)<!-- generated: end -->", re.S)
GENERATED_BY = "by `benchmarks/make_readme_table.py`"

# (CSV column, header, format)
TABLE = [
    ("method", "method", "s"),
    ("budget", "visual tokens", "d"),
    ("prompt_tokens", "prompt tokens", "d"),
    ("kv_blocks_per_request", "KV blocks / req", "d"),
    ("max_concurrent_requests", "max concurrent reqs", "d"),
    ("ttft_median_ms", "TTFT median (ms)", ".1f"),
    ("ttft_p90_ms", "TTFT p90 (ms)", ".1f"),
    ("ttft_speedup", "TTFT speed-up", ".2f"),
    ("ideal_speedup", "ideal (tokens)", ".2f"),
    ("adjusted_ideal_speedup", "ideal (vision fixed)", ".2f"),
    ("achieved_share", "achieved / ideal (vision fixed)", ".0%"),
    ("requests_per_s", "req/s", ".2f"),
    ("prune_ms", "pruning (ms / image)", ".2f"),
    ("prune_pct_ttft", "pruning % of TTFT", ".1f"),
]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    missing = {col for col, _, _ in TABLE} - set(rows[0])
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return rows


def _cell(value: str, fmt: str) -> str:
    if fmt == "s":
        return value
    try:
        number = float(value)
    except ValueError:
        return value or "–"
    if math.isnan(number):
        return "–"
    if fmt == "d":
        return str(int(number))
    return format(number, fmt)


def render_table(rows: list[dict]) -> str:
    """Markdown: a line stating machine, cache and settings, then one row per setting."""
    first = rows[0]
    lines = [
        f"Machine: {first.get('machine_desc') or first.get('machine', '?')}. "
        f"Model: {first.get('model') or '?'}. "
        f"TTFT: median / p90 of {first.get('n_ttft', '?')} requests per row, one at a time; "
        f"req/s: {first.get('n_throughput', '?')} requests per row at concurrency "
        f"{first.get('concurrency', '?')}, {first.get('output_tokens', '?')} output tokens "
        f"each; KV cache fixed at {first.get('kv_cache_gib', '?')} GiB = "
        f"{first.get('kv_cache_blocks', '?')} blocks of {first.get('block_size', '?')} "
        f"tokens; vision tower + projector {first.get('vision_ms', '?')} ms per image. "
        f"Generated from `{first.get('machine', '?')}` results by "
        "`benchmarks/make_readme_table.py`.",
        "",
        "| " + " | ".join(header for _, header, _ in TABLE) + " |",
        "|" + "|".join("---" if fmt == "s" else "---:" for _, _, fmt in TABLE) + "|",
    ]
    for row in rows:
        cells = [_cell(str(row.get(col, "")), fmt) for col, _, fmt in TABLE]
        if row.get("method") == "none":
            cells[0] = "none (unpruned)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def render_demo(path: Path) -> str:
    """`python -m vllm_script.demo --out` CSV -> the lines the demo printed, and where from."""
    from vllm_script.demo import format_table, read_rows

    rows = read_rows(path)
    on = rows[1]
    return (
        f"Machine: {on['machine_desc']}. Model: built-in random LLaVA-1.5 geometry, preset "
        f"`{on['size']}` ({on['model']}). Median of {on['requests']} requests per setting, "
        f"a fresh image each, prefix caching off; run {on['when']}, 1-minute load "
        f"average {on.get('load_avg') or '?'} at the end. Generated from "
        f"`{_rel(path)}` {GENERATED_BY}.\n\n```\n{format_table(rows)}\n```"
    )


LOAD_TABLE = [
    ("phase", "phase", "s"),
    ("requests", "requests", "d"),
    ("concurrency", "in flight", "d"),
    ("requests_per_s", "req/s", ".1f"),
    ("ttft_mean_ms", "TTFT mean (ms)", ".0f"),
    ("ttft_p90_ms", "TTFT p90 (ms)", ".0f"),
    ("mean_prompt_tokens", "prompt tokens (mean)", ".0f"),
]


def _rel(path: Path) -> str:
    """A result file's path as the documents name it (relative to the repository)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def spec_table(intro: str, spec: list[tuple[str, str, str]], rows: list[dict]) -> str:
    """`intro`, then a markdown table: one column per (CSV column, header, format)."""
    lines = [
        intro,
        "",
        "| " + " | ".join(header for _, header, _ in spec) + " |",
        "|" + "|".join("---" if fmt == "s" else "---:" for _, _, fmt in spec) + "|",
    ]
    for row in rows:
        cells = [_cell(str(row.get(col, "")), fmt) for col, _, fmt in spec]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_server_load(path: Path) -> str:
    """tests/test_server_load.py's CSV -> a table (subset rows share the burst's req/s)."""
    rows = read_csv(path)
    intro = (
        f"Machine: {rows[0].get('machine', '?')}; run {rows[0].get('when', '?')}. "
        f"Generated from `{_rel(path)}` {GENERATED_BY}."
    )
    return spec_table(intro, LOAD_TABLE, rows)


def _ms(value: str) -> str:
    return "" if value in ("", None) else f"{float(value) * 1e3:.3g}"


def render_kernels(path: Path) -> str:
    """bench_kernels.py's CSV -> one row per (op, geometry, batch, dtype, implementation)."""
    rows = read_csv(path)
    first = rows[0]
    lines = [
        f"Device: {first['device']}; D = {first['d']}; {first.get('note') or 'no note'}. "
        f"Median and p20-p80 of each row's repeats after a warm-up; `agree`: leading picks "
        f"equal to `torch-loop`'s (the reference; script `unshared`: to `auto`'s). Generated from "
        f"`{_rel(path)}` {GENERATED_BY}.",
        "",
        "| op | N -> K | images | dtype | implementation | threads | median (ms) "
        "| p20-p80 (ms) | agree |",
        "|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            timing, spread = r["status"], ""
        else:
            timing = _ms(r["median_s"])
            spread = f"{_ms(r['p20_s'])}-{_ms(r['p80_s'])}" if r["p20_s"] else ""
        lines.append(
            f"| {r['op']} | {r['n']} -> {r['k']} | {r['batch']} | {r['dtype']} | "
            f"{r['backend']} | {r['threads']} | {timing} | {spread} | {r['agree']} |"
        )
    return "\n".join(lines)


TTFT_TABLE = [
    ("geometry", "geometry", "s"),
    ("n", "N", "d"),
    ("k", "K", "d"),
    ("batch", "images", "d"),
    ("method", "method", "s"),
    ("ttft_off_ms", "TTFT off (ms)", ".1f"),
    ("ttft_on_ms", "TTFT on (ms)", ".1f"),
    ("select_ms", "selection (ms)", ".2f"),
    ("select_pct_ttft", "selection % of TTFT", ".1f"),
    ("speedup", "speed-up", ".2f"),
    ("ideal_speedup", "ideal", ".2f"),
    ("pct_of_ideal", "% of ideal", ".1f"),
]


def render_ttft(path: Path) -> str:
    """bench_ttft_projection.py's CSV -> a table per (geometry, batch, method)."""
    rows = read_csv(path)
    intro = (
        f"Device: {rows[0]['device']}, {rows[0]['dtype']}, median of {rows[0]['repeats']} "
        f"repeats. Generated from `{_rel(path)}` {GENERATED_BY}."
    )
    return spec_table(intro, TTFT_TABLE, rows)


RENDERERS: dict[str, Callable[[Path], str]] = {
    "kernels": render_kernels,
    "ttft": render_ttft,
    "serving": lambda path: render_table(read_rows(path)),
    "demo": render_demo,
    "server-load": render_server_load,
}


def render_block(kind: str, rel_path: str) -> str:
    if kind not in RENDERERS:
        raise ValueError(f"unknown generated-block kind {kind!r}; allowed: {sorted(RENDERERS)}")
    return RENDERERS[kind](ROOT / rel_path).rstrip("\n") + "\n"


def regenerate(text: str, render: Callable[[str, str], str] = render_block) -> str:
    """`text` with the body of every generated block replaced by `render(kind, path)`."""

    def replace(match: re.Match) -> str:
        kind, path = match.group(1), match.group(2)
        return f"<!-- generated: {kind} {path} -->\n{render(kind, path)}<!-- generated: end -->"

    return BLOCK.sub(replace, text)


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(kind, path, body) of every generated block in `text`."""
    return [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", nargs="?", default=None, help="with --print: a serving CSV")
    parser.add_argument("--print", action="store_true", help="print CSV's serving table only")
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is stale")
    args = parser.parse_args(argv)
    if args.print or args.csv:
        if not (args.print and args.csv):
            parser.error("CSV and --print go together")
        print(render_table(read_rows(Path(args.csv))))
        return 0
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = regenerate(text)
        if new != text:
            stale.append(doc)
            if not args.check:
                doc.write_text(new)
        print(
            f"{'stale' if args.check and new != text else 'ok' if new == text else 'updated'}"
            f": {doc.relative_to(ROOT)} ({len(blocks(text))} generated blocks)"
        )
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
