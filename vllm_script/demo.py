"""The main job on the built-in tiny model: serve image requests with and without pruning.

    python -m vllm_script.demo [--budget 64] [--method script] [--requests 6]

Writes a tiny random-weight LLaVA-1.5-shaped checkpoint (576 visual tokens per image),
starts one vLLM engine with pruning configured server-wide, and sends the same image
questions with pruning off (per request: method "none") and on, side by side. Prints
prompt tokens per image and time to first token (TTFT), before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

MODEL_SIZES = {
    "tiny": {},
    "small": {"text_hidden": 1024, "text_layers": 8, "head_dim": 128, "init_std": 0.02},
}
QUESTIONS = [
    "what is in the image?",
    "how many people are there?",
    "which color is the car?",
    "is it day or night?",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="script")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--requests", type=int, default=6, help="timed requests per setting")
    parser.add_argument("--model-dir", default=None, help="where to write the checkpoint")
    parser.add_argument(
        "--size",
        choices=sorted(MODEL_SIZES),
        default="small",
        help="tiny: the tests' 2-layer model (pruning overhead dominates); small: ~150M "
        "parameters, 8 layers of width 1024, so the LLM's prefill is what pruning saves",
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from vllm_script.testing import random_image, write_tiny_llava

    default_dir = Path(tempfile.gettempdir()) / f"vllm-script-{args.size}-llava"
    model_dir = Path(args.model_dir or default_dir)
    write_tiny_llava(model_dir, **MODEL_SIZES[args.size])
    settings = {"method": args.method, "budget": args.budget}
    print(f"[demo] checkpoint: {model_dir}\n[demo] server-wide settings: {settings}")
    llm = LLM(
        model=str(model_dir),
        max_model_len=2048,
        hf_overrides={"script": settings},
        enable_prefix_caching=False,  # every timed request must really prefill
        enforce_eager=True,
        seed=0,
    )
    one_token = SamplingParams(max_tokens=1, temperature=0)

    def run(seed: int, question: str, request_settings: dict | None):
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
    rows = {"off": [], "on": []}
    for i in range(args.requests):
        question = QUESTIONS[i % len(QUESTIONS)]
        # fresh image per request: no encoder-cache or prefix-cache hits in the timing
        rows["off"].append(run(2 * i, question, {"method": "none"}))
        rows["on"].append(run(2 * i + 1, question, None))

    text_tokens = run(99, QUESTIONS[0], {"method": "none"})[0] - 576
    off_tokens = statistics.median(r[0] for r in rows["off"])
    on_tokens = statistics.median(r[0] for r in rows["on"])
    off_ttft = statistics.median(r[1] for r in rows["off"])
    on_ttft = statistics.median(r[1] for r in rows["on"])
    print()
    print(f"[demo] {args.requests} requests per setting, median; {args.size} model, CPU backend")
    print(f"{'':22}{'pruning off':>14}{'pruning on':>14}")
    print(
        f"{'image tokens / image':22}{off_tokens - text_tokens:>14.0f}"
        f"{on_tokens - text_tokens:>14.0f}"
    )
    print(f"{'prompt tokens':22}{off_tokens:>14.0f}{on_tokens:>14.0f}")
    print(f"{'TTFT (ms)':22}{off_ttft * 1e3:>14.1f}{on_ttft * 1e3:>14.1f}")
    print(f"[demo] TTFT speed-up {off_ttft / on_ttft:.2f}x with {settings}")


if __name__ == "__main__":
    main()
