"""The OpenAI-compatible server (the README's CPU route) with the plugin, over loopback.

One server per module: `vllm-script serve` on the tiny checkpoint, server-wide Script
budget 64 (max_budget 256), `--trust-request-mm-kwargs`, the default
`request_kwargs: "script-only"`; the `openai` client talks to it. Covers images as
base64 data URLs, streaming and non-streaming, per-request settings through
`extra_body`, `usage.prompt_tokens`, bad input (4xx naming the problem, the server keeps
serving), per-request values at the edges of each allowed range (served normally),
processor kwargs other than `script` (refused), bad server settings (start-up refused),
`/metrics` and the start-up log line.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from server_utils import (
    SERVER_SETTINGS,
    VLLM_SCRIPT,
    N,
    image_url,
    messages,
    run_server_expecting_failure,
    script_kwargs,
)

from vllm_script import metrics
from vllm_script.config import METHODS

BUDGET = SERVER_SETTINGS["budget"]
QUESTION = "what is in the image?"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def client(server):
    c = server.client(timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def chat(client, model, question=QUESTION, images=(7,), extra=None, urls=(), **kw):
    return client.chat.completions.create(
        model=model,
        messages=messages(question, images, urls),
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=extra,
        **kw,
    )


def stream_chat(client, model, question=QUESTION, images=(7,), extra=None):
    """Streamed request -> (text, usage of the final chunk, number of content chunks)."""
    chunks = list(
        chat(
            client,
            model,
            question,
            images,
            extra,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    content_chunks = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    return text, chunks[-1].usage, content_chunks


# -- functional ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_prompt_tokens_reflect_pruning(client, model):
    off = chat(client, model, extra=script_kwargs(method="none"))
    on = chat(client, model)  # server default: script, budget 64
    wide = chat(client, model, extra=script_kwargs(budget=128))
    text_only = chat(client, model, images=())
    assert off.usage.prompt_tokens - on.usage.prompt_tokens == N - BUDGET
    assert wide.usage.prompt_tokens - on.usage.prompt_tokens == 128 - BUDGET
    assert on.usage.prompt_tokens - text_only.usage.prompt_tokens == BUDGET
    for r in (off, on, wide):
        assert r.choices[0].message.content and r.usage.completion_tokens == MAX_TOKENS


@pytest.mark.e2e
def test_two_images_prune_each(client, model):
    off = chat(client, model, images=(8, 9), extra=script_kwargs(method="none"))
    on = chat(client, model, images=(8, 9))
    assert off.usage.prompt_tokens - on.usage.prompt_tokens == 2 * (N - BUDGET)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["script", "gsp", "qcsp", "none"])
def test_streaming_equals_non_streaming(client, model, method):
    extra = script_kwargs(method=method, budget=32)
    plain = chat(client, model, images=(10,), extra=extra)
    text, usage, content_chunks = stream_chat(client, model, images=(10,), extra=extra)
    assert text == plain.choices[0].message.content
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    expected_visual = N if method == "none" else 32
    text_only = chat(client, model, images=())
    assert usage.prompt_tokens - text_only.usage.prompt_tokens == expected_visual
    assert content_chunks >= 2, "the answer was not streamed in pieces"


@pytest.mark.e2e
def test_greedy_answers_repeat(client, model):
    a = chat(client, model, images=(11,), extra=script_kwargs(method="qcsp"))
    b = chat(client, model, images=(11,), extra=script_kwargs(method="qcsp"))
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.e2e
def test_pruning_settings_without_an_image_serve_text_only(client, model):
    """Decided behaviour: settings on a text-only request are ignored (nothing to prune).

    vLLM's multimodal processor, where the settings are read, runs only for prompts with
    multimodal data; the request is served exactly as without the settings.
    """
    plain = chat(client, model, "tell me about the sky", images=())
    with_settings = chat(
        client, model, "tell me about the sky", images=(), extra=script_kwargs(budget=16)
    )
    assert with_settings.usage.prompt_tokens == plain.usage.prompt_tokens
    assert with_settings.choices[0].message.content == plain.choices[0].message.content


# -- bad input ----------------------------------------------------------------------------

CORRUPT_PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"x" * 64).decode()

BAD_REQUESTS = {
    "budget=0": (script_kwargs(budget=0), (), "script.budget"),
    "budget-str": (script_kwargs(budget="64"), (), "script.budget"),
    "budget-float": (script_kwargs(budget=12.5), (), "script.budget"),
    "budget>max_budget": (script_kwargs(budget=257), (), "max_budget"),
    "tau-out-of-range": (script_kwargs(tau=5), (), "script.tau"),
    "theta=1": (script_kwargs(theta=1.0), (), "script.theta"),
    "gamma<0": (script_kwargs(gamma=-1), (), "script.gamma"),
    "gsp_ratio>1": (script_kwargs(gsp_ratio=1.5), (), "script.gsp_ratio"),
    "unknown-method": (script_kwargs(method="fastv"), (), "script.method"),
    "unknown-key": (script_kwargs(colour="red"), (), "script.colour"),
    "server-only-key": (script_kwargs(max_budget=10), (), "script.max_budget"),
    "clip-without-checkpoint": (script_kwargs(relevance="clip"), (), "script.relevance"),
    "not-json": ({"mm_processor_kwargs": {"script": "{budget: 3"}}, (), "not valid JSON"),
    "not-an-object": ({"mm_processor_kwargs": {"script": [64]}}, (), "must be an object"),
    "corrupt-image": (None, (CORRUPT_PNG,), "image"),
    "bad-base64": (None, ("data:image/png;base64,@@@not-base64@@@",), "base64"),
    # settings of the wrong type: the same named-key message as other bad values
    "method-list": (script_kwargs(method=["script"]), (), "script.method"),
    "method-dict": (script_kwargs(method={"name": "script"}), (), "script.method"),
    "budget-list": (script_kwargs(budget=[64]), (), "script.budget"),
    "budget-dict": (script_kwargs(budget={"k": 64}), (), "script.budget"),
    "budget-bool": (script_kwargs(budget=True), (), "script.budget"),
    "budget-huge-int": (script_kwargs(budget=10**30), (), "script.budget"),
    "theta-str": (script_kwargs(theta="0.5"), (), "script.theta"),
    "theta-null": (script_kwargs(theta=None), (), "script.theta"),
    "tau-list": (script_kwargs(tau=[0.1]), (), "script.tau"),
    "gamma-bool": (script_kwargs(gamma=True), (), "script.gamma"),
    "gamma>20": (script_kwargs(gamma=20.000001), (), "script.gamma"),
    "relevance-list": (script_kwargs(relevance=["llm"]), (), "script.relevance"),
    "negate_relevance-str": (script_kwargs(negate_relevance="yes"), (), "script.negate_relevance"),
    "nested-script": ({"mm_processor_kwargs": {"script": {"script": {}}}}, (), "script.script"),
    # issue 15: image-processor kwargs that kill vanilla vLLM's engine on LLaVA-1.5 (a pixel
    # tensor of the wrong shape reaches the worker); refused under "script-only"
    "do_resize+do_center_crop-1x1": (
        {"mm_processor_kwargs": {"do_resize": False, "do_center_crop": False}},
        (image_url(3, 1),),
        "'do_center_crop', 'do_resize'",
    ),
    "do_center_crop-336x500": (
        {"mm_processor_kwargs": {"do_center_crop": False}},
        (image_url(4, 336, 500),),
        "'do_center_crop'",
    ),
    "script-and-another-kwarg": (
        {"mm_processor_kwargs": {"script": {"budget": 32}, "do_normalize": False}},
        (),
        "'do_normalize'",
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize(("extra", "urls", "named"), BAD_REQUESTS.values(), ids=BAD_REQUESTS)
def test_bad_request_is_4xx_and_server_keeps_serving(client, model, server, extra, urls, named):
    import openai

    images = () if urls else (12,)
    with pytest.raises(openai.APIStatusError) as info:
        chat(client, model, images=images, urls=urls, extra=extra)
    err = info.value
    assert 400 <= err.status_code < 500, (err.status_code, err.body)
    message = err.body.get("message", "") if isinstance(err.body, dict) else str(err.body)
    assert named.lower() in message.lower(), message
    # the server, engine included, is still serving
    good = chat(client, model, images=(12,))
    assert good.usage.prompt_tokens > BUDGET and good.choices[0].message.content
    assert server.alive()


def post_chat_raw(server, model: str, script_json: str) -> tuple[int, str]:
    """POST a chat request whose `script` setting is raw JSON text (NaN, 1e400, ...,
    which a JSON encoder would refuse to write) -> (status, body)."""
    body = json.dumps(
        {"model": model, "messages": messages(QUESTION, (12,)), "max_tokens": MAX_TOKENS}
    )
    body = body[:-1] + f', "mm_processor_kwargs": {{"script": {script_json}}}}}'
    request = urllib.request.Request(
        server.base_url + "/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


NON_FINITE = {
    "theta-NaN": '{"theta": NaN}',
    "theta-Infinity": '{"theta": Infinity}',
    "tau--Infinity": '{"tau": -Infinity}',
    "gamma-1e400": '{"gamma": 1e400}',
    "gsp_ratio-NaN": '{"gsp_ratio": NaN}',
    "budget-400-digits": '{"budget": 1' + "0" * 400 + "}",
}


@pytest.mark.e2e
@pytest.mark.parametrize("script_json", NON_FINITE.values(), ids=NON_FINITE)
def test_non_finite_and_huge_numbers_are_4xx(server, client, model, script_json):
    status, body = post_chat_raw(server, model, script_json)
    assert 400 <= status < 500, (status, body[:500])
    good = chat(client, model, images=(12,))
    assert good.usage.prompt_tokens > BUDGET and server.alive()


# -- edges of each allowed range (issue 10): served normally ------------------------------

MAX_BUDGET = SERVER_SETTINGS["max_budget"]
ALMOST_ONE = 0.9999999999999999  # the largest double below 1


def _edge_cases() -> dict[str, tuple[dict, int]]:
    """id -> (per-request settings, visual tokens the image must keep)."""
    cases: dict[str, tuple[dict, int]] = {}
    for method in ("script", "qcsp"):
        for theta in (0.0, 0.999, ALMOST_ONE):
            cases[f"{method}-theta={theta!r}"] = ({"method": method, "theta": theta}, BUDGET)
    for method in ("script", "gsp"):
        for key, values in (("tau", (-1, 1)), ("gamma", (0, 20))):
            for value in values:
                cases[f"{method}-{key}={value}"] = ({"method": method, key: value}, BUDGET)
    for ratio in (0, 1):
        cases[f"script-gsp_ratio={ratio}"] = ({"method": "script", "gsp_ratio": ratio}, BUDGET)
    everything = {"tau": -1, "gamma": 20, "gsp_ratio": 1, "theta": ALMOST_ONE}
    cases["script-all-edges-at-once"] = ({"method": "script", **everything}, BUDGET)
    for method in (m for m in METHODS if m != "none"):
        for budget in (1, MAX_BUDGET):
            cases[f"{method}-budget={budget}"] = ({"method": method, "budget": budget}, budget)
    cases["script-null"] = (None, BUDGET)  # {"script": null}: the server's settings
    return cases


EDGES = _edge_cases()


@pytest.fixture(scope="module")
def text_only_tokens(client, model) -> int:
    return chat(client, model, images=()).usage.prompt_tokens


@pytest.mark.e2e
@pytest.mark.parametrize(("settings", "kept"), EDGES.values(), ids=EDGES)
def test_edge_of_allowed_range_is_served(client, model, server, text_only_tokens, settings, kept):
    extra = {"mm_processor_kwargs": {"script": settings}}
    resp = chat(client, model, images=(15,), extra=extra)
    assert resp.usage.prompt_tokens - text_only_tokens == kept
    assert resp.choices[0].finish_reason in ("stop", "length")
    # the engine is unharmed: the next request is served too
    good = chat(client, model, images=(16,))
    assert good.usage.prompt_tokens - text_only_tokens == BUDGET and server.alive()


@pytest.mark.e2e
def test_bad_request_while_streaming_is_4xx(client, model):
    import openai

    with pytest.raises(openai.APIStatusError) as info:
        stream_chat(client, model, extra=script_kwargs(budget=-3))
    assert 400 <= info.value.status_code < 500
    assert "script.budget" in str(info.value.body)
    text, usage, _ = stream_chat(client, model)
    assert text and usage.prompt_tokens > BUDGET


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"method": "bogus"}, "script.method"),
        ({"budget": 300, "max_budget": 256}, "script.budget"),
    ],
    ids=["unknown-method", "budget>max_budget"],
)
def test_bad_server_settings_stop_start_up(tiny_llava, settings, named):
    log = run_server_expecting_failure(tiny_llava, settings)
    assert named in log, log[-3000:]


# -- observability ------------------------------------------------------------------------


@pytest.mark.e2e
def test_metrics_count_kept_and_pruned_tokens(server, client, model):
    # no skip guard: a processor that stops calling record_image must fail here
    before = metrics.parse_metrics(server.get("/metrics"))
    chat(client, model, images=(13,), extra=script_kwargs(method="gsp", budget=48))
    chat(client, model, images=(14,), extra=script_kwargs(method="none"))
    after = metrics.parse_metrics(server.get("/metrics"))

    def delta(name, method):
        key = (f"{name}_total", method)
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta(metrics.KEPT, "gsp") == 48
    assert delta(metrics.PRUNED, "gsp") == N - 48
    assert delta(metrics.IMAGES_PRUNED, "gsp") == 1
    assert delta(metrics.KEPT, "none") == N
    assert delta(metrics.PRUNED, "none") == 0


@pytest.mark.e2e
def test_start_up_traffic_is_not_counted(server):
    """vLLM's warm-up and profiling process dummy images at start-up: not user requests."""
    at_start = metrics.parse_metrics(server.startup_metrics)
    counted = {key: value for key, value in at_start.items() if value}
    assert not counted, counted


@pytest.mark.e2e
def test_start_up_log_states_the_pruning_settings(server):
    log = server.log_text()
    assert "vllm-script" in log, (
        "start-up log line not emitted (the 'vllm_script' logger needs vLLM's handlers, "
        "see docs/serving.md, Observability):\n" + log[-3000:]
    )
    lines = [line for line in log.splitlines() if "vllm-script" in line and "budget" in line]
    assert lines, log[-3000:]
    assert '"budget":64' in lines[0] and '"method":"script"' in lines[0]
    assert '"max_budget":256' in lines[0]


# -- the `vllm bench serve` recipe of docs/serving.md -------------------------------------

SERVING_MD = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
RECIPE_PROMPTS = 8
OUTPUT_LEN = 16  # the recipe's --random-output-len (with --ignore-eos)


def recipe_script(base_url: str, model_dir: str, result_dir: Path) -> str:
    """The recipe's client block from docs/serving.md, pointed at this server."""
    text = SERVING_MD.read_text()
    marker = text.index("<!-- bench-serve-recipe")
    block = re.search(r"```bash\n(.*?)```", text[marker:], re.S).group(1)
    first, rest = block.split("\n", 1)
    assert first.startswith("URL="), first
    assert "--result-dir results" in rest and ".venv/bin/vllm-script" in rest
    rest = rest.replace("--result-dir results", f"--result-dir {result_dir}")
    rest = rest.replace(".venv/bin/vllm-script", str(VLLM_SCRIPT))
    return f"URL={base_url} MODEL={model_dir} PROMPTS={RECIPE_PROMPTS}\n{rest}"


@pytest.mark.e2e
def test_bench_serve_recipe(server, tmp_path):
    """The documented `vllm bench serve` pair (pruned, then unpruned on a new seed) runs
    against the server; its token counts and /metrics agree with the count rule."""
    before = metrics.parse_metrics(server.get("/metrics"))
    script = recipe_script(server.base_url, server.model_dir, tmp_path / "results")
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("Successful requests:") == 2, out.stdout[-3000:]
    pruned, unpruned = (
        json.loads((tmp_path / "results" / f"{name}.json").read_text())
        for name in ("pruned", "unpruned")
    )
    for result in (pruned, unpruned):
        assert (result["completed"], result["failed"]) == (RECIPE_PROMPTS, 0)
        assert result["total_output_tokens"] == RECIPE_PROMPTS * OUTPUT_LEN
    saved = unpruned["total_input_tokens"] - pruned["total_input_tokens"]
    assert saved == RECIPE_PROMPTS * (N - BUDGET)

    after = metrics.parse_metrics(server.get("/metrics"))

    def delta(name, method):
        key = (f"{name}_total", method)
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta(metrics.IMAGES, "script") == RECIPE_PROMPTS
    assert delta(metrics.KEPT, "script") == RECIPE_PROMPTS * BUDGET
    assert delta(metrics.PRUNED, "script") == RECIPE_PROMPTS * (N - BUDGET)
    assert delta(metrics.KEPT, "none") == RECIPE_PROMPTS * N
    assert delta(metrics.PRUNED, "none") == 0


# -- metrics module (no server) -----------------------------------------------------------


def test_record_image_counts_per_method():
    from prometheus_client import REGISTRY, generate_latest

    before = metrics.parse_metrics(generate_latest(REGISTRY).decode())
    metrics.record_image("script", 576, 64)
    metrics.record_image("script", 576, 576)
    metrics.record_image("uniform", 100, 10)
    metrics.record_image("script", 10, 11)  # invalid: ignored, never raises
    after = metrics.parse_metrics(generate_latest(REGISTRY).decode())

    def delta(name, method):
        key = (f"{name}_total", method)
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta(metrics.KEPT, "script") == 64 + 576
    assert delta(metrics.PRUNED, "script") == 512
    assert delta(metrics.IMAGES, "script") == 2
    assert delta(metrics.IMAGES_PRUNED, "script") == 1
    assert delta(metrics.KEPT, "uniform") == 10 and delta(metrics.PRUNED, "uniform") == 90


def test_metrics_module_registers_nothing_on_import():
    import importlib
    import sys

    from prometheus_client import REGISTRY

    saved = sys.modules.pop("vllm_script.metrics")
    try:
        names_before = set(REGISTRY._names_to_collectors)
        importlib.import_module("vllm_script.metrics")
        assert set(REGISTRY._names_to_collectors) == names_before
    finally:
        sys.modules["vllm_script.metrics"] = saved
