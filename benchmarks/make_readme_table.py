"""Turn a serving-benchmark CSV into a markdown table inside README.md.

    .venv/bin/python benchmarks/make_readme_table.py [CSV] [--readme README.md] [--print]

CSV defaults to the newest benchmarks/results/serving_*.csv. The table replaces whatever
is between the `<!-- serving-table:start -->` and `<!-- serving-table:end -->` lines of
the README (both must be there, once each); `--print` prints it instead.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- serving-table:start -->"
END = "<!-- serving-table:end -->"

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


def replace_block(text: str, table: str) -> str:
    """`text` with everything between the START and END marker lines replaced by `table`."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"the README needs exactly one {START} and one {END} line")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    if not head.endswith("\n") and head:
        head += "\n"
    return f"{head}{START}\n{table}\n{END}{tail}"


def newest_csv() -> Path:
    found = sorted(
        (ROOT / "benchmarks" / "results").glob("serving_*.csv"), key=lambda p: p.stat().st_mtime
    )
    if not found:
        raise SystemExit("no benchmarks/results/serving_*.csv; run benchmarks/bench_serving.py")
    return found[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", nargs="?", default=None)
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--print", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    table = render_table(read_rows(Path(args.csv) if args.csv else newest_csv()))
    if args.print:
        print(table)
        return
    readme = Path(args.readme)
    readme.write_text(replace_block(readme.read_text(), table))
    print(f"updated {readme}")


if __name__ == "__main__":
    main(sys.argv[1:])
