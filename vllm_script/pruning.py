"""Apply the configured method to a batch of images' visual tokens (no vLLM imports).

The model side of every architecture calls `prune_items`; it groups items that share
a token count and settings, selects per group in one batched call, and gathers.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Sequence

import torch

from vllm_script.config import ScriptSettings, kept_count
from vllm_script.methods.base import Selection, apply_selection
from vllm_script.methods.gsp import gsp_select
from vllm_script.methods.qcsp import qcsp_select
from vllm_script.methods.script import script_select
from vllm_script.relevance import llm_relevance

logger = logging.getLogger("vllm_script")

# Debugging / tests / visualisation: with VLLM_SCRIPT_RECORD_SELECTIONS=1 each worker
# keeps the last selections it made (method, N, K, kept indices, question ids).
RECORD_ENV = "VLLM_SCRIPT_RECORD_SELECTIONS"
_recent: deque[dict] = deque(maxlen=256)


def recent_selections(_worker: object = None) -> list[dict]:
    """The selections this process recorded (oldest first); usable as a collective_rpc."""
    return list(_recent)


def select_tokens(
    tokens: torch.Tensor,
    k: int,
    settings: ScriptSettings,
    relevance: torch.Tensor | None,
) -> Selection:
    """[B, N, D] LLM-space tokens, k -> Selection by `settings.method`."""
    method = settings.method
    if method == "script":
        return script_select(
            tokens,
            relevance,
            k,
            tau=settings.tau,
            gamma=settings.gamma,
            theta=settings.theta,
            gsp_ratio=settings.gsp_ratio,
        )
    if method == "qcsp":
        return qcsp_select(tokens, relevance, k, theta=settings.theta)
    if method == "gsp":
        return gsp_select(tokens, k, tau=settings.tau, gamma=settings.gamma)
    raise NotImplementedError(f"method {method!r} is not wired into the model side yet")


def prune_items(
    embeds: Sequence[torch.Tensor],
    settings: Sequence[ScriptSettings | None],
    queries: Sequence[torch.Tensor],
    embed_query: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """n x [N_i, D], settings, query ids -> n x [K_i, D], K_i = kept_count(N_i, settings_i).

    Kept rows stay in their original order. Items whose settings keep every token are
    returned untouched (the same tensor object).
    """
    out: list[torch.Tensor] = list(embeds)
    groups: dict[tuple[int, ScriptSettings], list[int]] = {}
    for i, (emb, cfg) in enumerate(zip(embeds, settings, strict=True)):
        if cfg is not None and kept_count(emb.shape[0], cfg) < emb.shape[0]:
            groups.setdefault((emb.shape[0], cfg), []).append(i)

    for (n, cfg), idxs in groups.items():
        k = kept_count(n, cfg)
        tokens = torch.stack([embeds[i] for i in idxs])
        relevance = None
        if cfg.needs_query:
            relevance = llm_relevance(tokens, [embed_query(queries[i]) for i in idxs])
        selection = select_tokens(tokens, k, cfg, relevance)
        pruned = apply_selection(tokens, selection)
        if pruned.shape[1] != k:
            raise RuntimeError(f"{cfg.method} returned {pruned.shape[1]} tokens, promised {k}")
        for row, i in enumerate(idxs):
            out[i] = pruned[row]
        if os.environ.get(RECORD_ENV) == "1":
            for row, i in enumerate(idxs):
                _recent.append(
                    {
                        "method": cfg.method,
                        "num_tokens": n,
                        "kept": k,
                        "keep": selection.keep[row].tolist(),
                        "query": queries[i].tolist() if queries[i] is not None else [],
                    }
                )
        logger.debug("pruned %d item(s) %d -> %d tokens with %s", len(idxs), n, k, cfg.method)
    return out
