"""Shared by the end-to-end tests: one request format, one way to run it.

A request is a dict: {"question": str, "images": [seed or [seed, width, height], ...],
"videos": [seed or [seed, frames], ...] (optional), "template": a TEMPLATES key
(optional, default llava), "mm_processor_kwargs": {...} (optional), "max_tokens": int
(optional), "logprobs": int (optional)}. A result is {"prompt_len": int, "tokens": [int,
...], "cached": prefix-cache hit tokens} (plus "prompt": the prompt's token ids and
"logprobs": [[token id, logprob] x n per step] when the request asks for logprobs) or
{"error": str}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ENGINE_KWARGS = dict(
    max_model_len=2048, enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 2}
)
RUNNER = Path(__file__).with_name("engine_runner.py")


# template -> (prompt with {media} and {question}, image tag, video tag)
TEMPLATES = {
    "llava": ("USER: {media}{question} ASSISTANT:", "<image>\n", None),
    "qwen": (
        "<|im_start|>user {media}{question}<|im_end|> <|im_start|>assistant ",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
    ),
    "gemma3": (
        "<start_of_turn>user {media}{question}<end_of_turn> <start_of_turn>model ",
        "<start_of_image>",
        None,
    ),
    "internvl": (
        "<|im_start|>user {media}{question}<|im_end|> <|im_start|>assistant ",
        "<IMG_CONTEXT>",
        None,
    ),
    "llava_onevision": (
        "<|im_start|>user {media}{question}<|im_end|> <|im_start|>assistant ",
        "<image>\n",
        None,
    ),
}


def vision_width(model_dir: Path) -> int:
    """The vision tower's hidden size of a checkpoint written by `vllm_script.testing`."""
    return json.loads((Path(model_dir) / "config.json").read_text())["vision_config"]["hidden_size"]


def make_prompt(request: dict) -> dict:
    from vllm_script.testing import random_image, random_video

    template, image_tag, video_tag = TEMPLATES[request.get("template", "llava")]
    images = [random_image(*(s if isinstance(s, list) else [s])) for s in request["images"]]
    videos = [random_video(*(s if isinstance(s, list) else [s])) for s in request.get("videos", [])]
    media = image_tag * len(images) + (video_tag or "") * len(videos)
    prompt = {"prompt": template.format(media=media, question=request["question"])}
    data = {}
    if images:
        data["image"] = images if len(images) > 1 else images[0]
    if videos:
        data["video"] = videos if len(videos) > 1 else videos[0]
    if data:
        prompt["multi_modal_data"] = data
    if "mm_processor_kwargs" in request:
        prompt["mm_processor_kwargs"] = request["mm_processor_kwargs"]
    return prompt


def _sampling(request: dict):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=request.get("max_tokens", 6), temperature=0, logprobs=request.get("logprobs")
    )


def _result(request: dict, out) -> dict:
    result = {
        "prompt_len": len(out.prompt_token_ids),
        "tokens": list(out.outputs[0].token_ids),
        "cached": out.num_cached_tokens or 0,
    }
    if request.get("logprobs"):
        result["prompt"] = list(out.prompt_token_ids)
        result["logprobs"] = [
            sorted([t, lp.logprob] for t, lp in step.items()) for step in out.outputs[0].logprobs
        ]
    return result


def run_requests(llm, requests: list[dict]) -> list[dict]:
    """Run each request alone (greedy) on `llm`; errors are captured per request."""
    results = []
    for request in requests:
        try:
            out = llm.generate(make_prompt(request), _sampling(request), use_tqdm=False)[0]
        except Exception as exc:  # the test inspects the message
            results.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        results.append(_result(request, out))
    return results


def run_batch(llm, requests: list[dict]) -> list[dict]:
    """Run all requests in one generate call (greedy): one engine batch, results in order.
    A request the processor refuses fails the whole call."""
    prompts = [make_prompt(r) for r in requests]
    outs = llm.generate(prompts, [_sampling(r) for r in requests], use_tqdm=False)
    return [_result(r, out) for r, out in zip(requests, outs, strict=True)]


def answers(results: list[dict]) -> list[tuple[int, list[int]]]:
    """(prompt length, generated tokens) per result; fails on any per-request error."""
    assert all("error" not in r for r in results), results
    return [(r["prompt_len"], r["tokens"]) for r in results]


def run_in_fresh_engine(
    model_dir: Path,
    requests: list[dict],
    *,
    plugins: bool = True,
    engine_kwargs: dict | None = None,
    timeout: float = 600,
    output: list[str] | None = None,
) -> list[dict]:
    """Start a new engine in a separate Python process and run `requests` there.

    plugins=False runs vanilla vLLM (VLLM_PLUGINS set to an allow-list matching nothing),
    which a process that already loaded the plugin cannot do. If `output` is a list, the
    process's stdout and stderr (its engine and workers' logs) are appended to it.
    """
    env = dict(os.environ)
    env["VLLM_PLUGINS"] = "script" if plugins else "none-at-all"
    spec = {"model": str(model_dir), "requests": requests, "engine_kwargs": engine_kwargs or {}}
    proc = subprocess.run(
        [sys.executable, str(RUNNER)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if output is not None:
        output += [proc.stdout, proc.stderr]
    marker = "ENGINE_RUNNER_RESULT "
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker) :])
    raise RuntimeError(f"engine runner failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")


def runner_hook_state(worker) -> dict:
    """(collective_rpc) Whether vLLM's GPU model runner would call the model's
    `recompute_mrope_positions` hook (the expression GPUModelRunner.load_model computes),
    whether the in-tree EVS is on, whether this runner calls the hook, and the rotary
    table size the model clamps positions to."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    runner = worker.model_runner
    model = runner.get_model()
    return {
        "gpu_runner_calls_hook": bool(
            supports_multimodal_pruning(model)
            and runner.model_config.multimodal_config.is_multimodal_pruning_enabled()
        ),
        "in_tree_evs": bool(model.is_multimodal_pruning_enabled),
        "this_runner_calls_hook": bool(runner.is_multimodal_pruning_enabled),
        "position_limit": getattr(model, "_script_position_limit", None),
    }


def set_runner_hook(on: bool):
    """A collective_rpc setting the runner's flag as GPUModelRunner.load_model does: the
    CPU runner (a GPUModelRunner subclass) then runs the GPU runner's hook code path."""

    def apply(worker) -> None:
        worker.model_runner.is_multimodal_pruning_enabled = on

    return apply
