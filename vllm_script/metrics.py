"""Prometheus counters for the visual tokens the plugin keeps and prunes.

Call `record_image(method, num_tokens, kept)` once per image per user request, in the
front-end (the processor runs in vLLM's API server process, whose `/metrics` serves
prometheus_client's default registry). vLLM's start-up warm-up and memory profiling
send dummy images through the same processor; the processor does not record those
(`vllm_script.models.common.profiling()`), so the counters start at zero. The
counters, by method:

    vllm_script_visual_tokens_kept_total{method}    visual tokens sent to the LLM
    vllm_script_visual_tokens_pruned_total{method}  visual tokens dropped before it
    vllm_script_images_total{method}                images that went through the plugin
    vllm_script_images_pruned_total{method}         of those, images with kept < N

`method="none"` counts images served unpruned (a request that turned pruning off).
Savings: pruned / (kept + pruned).

The counters are created on first use (importing this module registers nothing), in
prometheus_client's default registry. With several API servers (`--api-server-count`
> 1) vLLM sets `PROMETHEUS_MULTIPROC_DIR` before starting them and serves a
`MultiProcessCollector` over that directory; prometheus_client then writes these
counters to per-process files there, so `/metrics` shows the sum over API servers.
Without prometheus_client (it comes with vLLM) recording is a no-op.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("vllm_script")

PREFIX = "vllm_script"
KEPT = f"{PREFIX}_visual_tokens_kept"
PRUNED = f"{PREFIX}_visual_tokens_pruned"
IMAGES = f"{PREFIX}_images"
IMAGES_PRUNED = f"{PREFIX}_images_pruned"

_lock = threading.Lock()
_counters: dict[str, object] | None = None
_unavailable = False


def _create(registry=None) -> dict[str, object] | None:
    global _unavailable
    try:
        from prometheus_client import REGISTRY, Counter
    except ImportError:  # pragma: no cover - vLLM depends on prometheus_client
        _unavailable = True
        logger.warning("vllm-script: prometheus_client not installed; no pruning metrics")
        return None
    registry = REGISTRY if registry is None else registry
    specs = {
        KEPT: "Visual tokens kept (sent to the LLM) by vllm-script, per method.",
        PRUNED: "Visual tokens pruned before the LLM by vllm-script, per method.",
        IMAGES: "Images processed by vllm-script (pruned or not), per method.",
        IMAGES_PRUNED: "Images of which vllm-script pruned at least one token, per method.",
    }
    counters = {}
    for name, doc in specs.items():
        try:
            counters[name] = Counter(name, doc, ["method"], registry=registry)
        except ValueError:  # already registered (e.g. module reloaded): reuse it
            counters[name] = registry._names_to_collectors[name + "_total"]
    return counters


def counters(registry=None) -> dict[str, object] | None:
    """The counters by name (created on first call); None without prometheus_client."""
    global _counters
    if _counters is None and not _unavailable:
        with _lock:
            if _counters is None and not _unavailable:
                _counters = _create(registry)
    return _counters


def record_image(method: str, num_tokens: int, kept: int) -> None:
    """Count one image of `num_tokens` visual tokens of which `kept` reach the LLM.

    Never raises: a metrics problem must not fail a request (it is logged once).
    """
    try:
        num_tokens, kept = int(num_tokens), int(kept)
        if num_tokens < 0 or not 0 <= kept <= num_tokens:
            raise ValueError(f"kept={kept} not in [0, num_tokens={num_tokens}]")
        found = counters()
        if found is None:
            return
        label = str(method)
        found[KEPT].labels(method=label).inc(kept)
        found[PRUNED].labels(method=label).inc(num_tokens - kept)
        found[IMAGES].labels(method=label).inc()
        if kept < num_tokens:
            found[IMAGES_PRUNED].labels(method=label).inc()
    except Exception as exc:  # noqa: BLE001 - metrics must never break serving
        _warn_once(exc)


_warned = False


def _warn_once(exc: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning("vllm-script: could not record pruning metrics: %s", exc)


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """Prometheus text -> {(sample name, method): value} for this module's counters.

    For tests and operators' scripts: `parse_metrics(requests.get(url).text)`.
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX):
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and "method" in sample.labels:
                key = (sample.name, sample.labels["method"])
                out[key] = out.get(key, 0.0) + sample.value
    return out
