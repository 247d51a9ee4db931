"""Apply the configured method to a batch of images' visual tokens (no vLLM imports).

The model side of every architecture describes each image as an `ImageInput` and
calls `prune_items`; it groups items that share a token count and settings, selects per
group in one batched call, and returns exactly `kept_count(N, settings)` rows per image.

Where each method works:

- LLM space (post-projector tokens): `script`, `gsp`, `qcsp`, `divprune`, `uniform`.
  Their rows are the kept projected tokens.
- Vision space (pre-projector patch features: the vision tower's selected layer, CLS
  dropped): `trim` and `prumerge+`. Their kept, merged and extra rows are built from the
  features and then projected, so the LLM receives projector outputs only.

Relevance (`script`, `qcsp`, `trim`): `relevance="llm"` uses the question's token ids
embedded with the LLM's input-embedding table; `relevance="clip"` the question's text
through a CLIP text tower against `visual_projection(post_layernorm(features))` (the
server's `clip_path` checkpoint, see `vllm_script.clip_text`). TRIM's score is CLIP's
metric; with `relevance="llm"` TRIM runs on an LLM-space proxy (softmax over patches of
the cosine between the projected tokens and the mean of the question's normalised input
embeddings) so it also works without a CLIP checkpoint. `negate_relevance` flips the
sign of CLIP similarities only (the authors' code), for every method that uses them.

`reference="code"` selects as each method's released code does (see README, "Fidelity"):
the methods get `reference="code"`, and CLIP similarities are negated as every released
code negates them; Script's code takes raw dot products of the CLIP embeddings (segments
averaged) and TRIM's the raw dot product with the question's first CLIP segment.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_script.config import ScriptSettings, kept_count
from vllm_script.cpu_threads import selection_threads
from vllm_script.methods import (
    Selection,
    apply_selection,
    clip_relevance,
    cls_attention_from_qk,
    divprune_select,
    gsp_select,
    prumerge_plus_select,
    qcsp_select,
    script_select,
    trim_select,
    uniform_select,
)
from vllm_script.relevance import llm_relevance

logger = logging.getLogger("vllm_script")

# Debugging / tests / visualisation: with VLLM_SCRIPT_RECORD_SELECTIONS=1 each worker
# keeps the last selections it made (method, N, K, kept indices, question ids, ...).
RECORD_ENV = "VLLM_SCRIPT_RECORD_SELECTIONS"
_recent: deque[dict] = deque(maxlen=256)

LLM_SPACE_METHODS = ("script", "gsp", "qcsp", "divprune", "uniform")
VISION_SPACE_METHODS = ("trim", "prumerge+")


def record(entry: dict) -> None:
    """Add one entry to this process's recorder (see RECORD_ENV)."""
    _recent.append(entry)


def recent_selections(_worker: object = None) -> list[dict]:
    """The selections this process recorded (oldest first); usable as a collective_rpc."""
    return list(_recent)


@dataclass
class ImageInput:
    """One image as the model side has it (fields a method does not need may be None).

    tokens:     [N, D] post-projector tokens; None when `features` is given and the
                context has `project` (projected here only if a method needs them).
    features:   [N, Dv] pre-projector patch features (the vision tower's selected layer,
                CLS dropped). Needed by `trim`, `prumerge+` and `relevance="clip"`.
    cls_query:  [Dk] query of the CLS token at the vision layer whose attention
                PruMerge+ uses; `layer_keys`: [M, Dk] keys of all M tokens of that layer
                (prefix / CLS first, the N patches last). Needed by `prumerge+`.
    grid:       (h, w) raster layout of the N tokens, or None (1-D) for `uniform` and
                `prumerge+`'s uniform top-up.
    query_ids:  the question's LLM token ids; `query_text`: its text (for CLIP).
    """

    tokens: torch.Tensor | None = None
    features: torch.Tensor | None = None
    cls_query: torch.Tensor | None = None
    layer_keys: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    query_ids: torch.Tensor | None = None
    query_text: str = ""

    @property
    def num_tokens(self) -> int:
        return self._ref.shape[0]

    @property
    def device(self) -> torch.device:
        return self._ref.device

    @property
    def _ref(self) -> torch.Tensor:
        ref = self.tokens if self.tokens is not None else self.features
        assert ref is not None, "an ImageInput needs tokens or features"
        return ref


@dataclass
class PruneContext:
    """What the model provides to `prune_items`.

    embed_query: LLM token ids [T] -> [T, D] input embeddings (relevance "llm").
    project:     [..., Dv] pre-projector features -> [..., D] tokens (the projector);
                 None if the architecture gives only post-projector tokens.
    clip:        a loaded `vllm_script.clip_text.ClipRelevance`, or None (no clip_path).
    """

    embed_query: Callable[[torch.Tensor], torch.Tensor]
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    clip: object | None = None


def square_grid(num_tokens: int) -> tuple[int, int] | None:
    """(s, s) when num_tokens == s * s (LLaVA-1.5: 576 -> (24, 24)), else None."""
    side = math.isqrt(num_tokens)
    return (side, side) if side * side == num_tokens else None


class _Group:
    """Items of one (N, settings) group, with lazily built stacked inputs."""

    def __init__(self, items: list[ImageInput], cfg: ScriptSettings, ctx: PruneContext):
        self.items, self.cfg, self.ctx = items, cfg, ctx
        self._tokens: torch.Tensor | None = None
        self._stacked: dict[str, torch.Tensor] = {}

    def need(self, name: str) -> torch.Tensor:
        if name in self._stacked:
            return self._stacked[name]
        values = [getattr(item, name) for item in self.items]
        if any(v is None for v in values):
            raise RuntimeError(
                f"method {self.cfg.method!r} needs the images' {name}, which this "
                f"architecture does not provide to vllm-script"
            )
        self._stacked[name] = torch.stack(values)
        return self._stacked[name]

    @property
    def features(self) -> torch.Tensor:
        return self.need("features")

    @property
    def tokens(self) -> torch.Tensor:
        if self._tokens is None:
            if all(item.tokens is not None for item in self.items):
                self._tokens = torch.stack([item.tokens for item in self.items])
            elif self.ctx.project is not None:
                self._tokens = self.ctx.project(self.features)
            else:
                self._tokens = self.need("tokens")
        return self._tokens

    @property
    def select_tokens(self) -> torch.Tensor:
        """The tokens as the LLM-space selections read them: fp32 once on CPU (every step
        computes in fp32; converting once saves a copy per step), as they are on a GPU
        (bf16/fp16 feed the tensor cores). The rows applied stay `tokens`."""
        if "select" not in self._stacked:
            tokens = self.tokens
            self._stacked["select"] = tokens.float() if tokens.device.type == "cpu" else tokens
        return self._stacked["select"]

    def clip_model(self):
        if self.ctx.clip is None:
            raise RuntimeError(
                "relevance='clip' needs the server's clip_path checkpoint, which is not loaded"
            )
        return self.ctx.clip

    def clip_image_embeds(self) -> torch.Tensor:
        return self.clip_model().image_embeds(self.features)

    def clip_text_embeds(self) -> torch.Tensor:
        return self.clip_model().text_embeds([item.query_text for item in self.items])

    def clip_text_segments(self) -> list[torch.Tensor]:
        """B x [T_b, E]: the question's raw (unnormalised) CLIP segment embeddings."""
        return self.clip_model().text_segment_embeds([item.query_text for item in self.items])

    @property
    def code(self) -> bool:
        return self.cfg.reference == "code"

    @property
    def negate_clip(self) -> bool:
        """Negate CLIP similarities: asked for, or as every released code does."""
        return self.cfg.negate_relevance or self.code

    def query_embeds(self) -> list[torch.Tensor]:
        return [
            self.ctx.embed_query(
                item.query_ids if item.query_ids is not None else torch.zeros(0, dtype=torch.long)
            )
            for item in self.items
        ]

    def relevance(self) -> torch.Tensor:
        """[B, N] in [0, 1] from the configured source."""
        if self.cfg.relevance == "clip":
            if self.code and self.cfg.method == "script":  # Script's code: raw dot products
                text = torch.stack([seg.float().mean(dim=0) for seg in self.clip_text_segments()])
                image = self.clip_image_embeds()
                rel = clip_relevance(image, text.to(image.device), negate=True, normalize=False)
                return rel.to(self.tokens.device)
            return clip_relevance(
                self.clip_image_embeds(), self.clip_text_embeds(), negate=self.negate_clip
            ).to(self.tokens.device)
        return llm_relevance(self.select_tokens, self.query_embeds())

    def trim_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeds [B, N, E], question embeds [B, E]) for TRIM's score."""
        if self.cfg.relevance == "clip":
            image = self.clip_image_embeds()
            if self.code:  # the code truncates the question to one CLIP context
                text = torch.stack([seg[0].float() for seg in self.clip_text_segments()])
            else:
                text = self.clip_text_embeds()
            return image, text.to(image.device)
        tokens = self.tokens
        text = []
        for q in self.query_embeds():
            if q.numel() == 0:  # no question: equal scores, TRIM keeps the first tokens
                text.append(tokens.new_zeros(tokens.shape[-1], dtype=torch.float32))
            else:
                text.append(F.normalize(q.float(), dim=-1).mean(dim=0))
        return tokens, torch.stack(text)


def _select(group: _Group, k: int) -> tuple[Selection, torch.Tensor]:
    """Select per `group.cfg.method`; returns the selection and what it applies to."""
    cfg, n = group.cfg, group.items[0].num_tokens
    method = cfg.method
    if method == "script":
        selection = script_select(
            group.select_tokens,
            group.relevance(),
            k,
            tau=cfg.tau,
            gamma=cfg.gamma,
            theta=cfg.theta,
            gsp_ratio=cfg.gsp_ratio,
            reference=cfg.reference,
        )
        return selection, group.tokens
    if method == "qcsp":
        selection = qcsp_select(
            group.select_tokens, group.relevance(), k, theta=cfg.theta, reference=cfg.reference
        )
        return selection, group.tokens
    if method == "gsp":
        return gsp_select(group.select_tokens, k, tau=cfg.tau, gamma=cfg.gamma), group.tokens
    if method == "divprune":
        return divprune_select(group.select_tokens, k, reference=cfg.reference), group.tokens
    if method == "uniform":
        tokens = group.tokens
        selection = uniform_select(n, k, group.items[0].grid, batch=len(group.items))
        selection.keep = selection.keep.to(tokens.device)
        return selection, tokens
    if method == "trim":
        features = group.features
        image, text = group.trim_embeds()
        negate = group.negate_clip and cfg.relevance == "clip"  # a CLIP quirk: not the proxy
        selection = trim_select(
            features, image.to(features.device), text, k, negate=negate, reference=cfg.reference
        )
        return selection, features
    if method == "prumerge+":
        features = group.features
        layer_keys = group.need("layer_keys")
        cls_attention = cls_attention_from_qk(
            group.need("cls_query"),
            layer_keys,
            num_heads=1,  # the authors' code: one full-width head
            num_prefix=layer_keys.shape[1] - n,
        )
        selection = prumerge_plus_select(
            features,
            layer_keys[:, -n:],
            cls_attention,
            k,
            group.items[0].grid,
            reference=cfg.reference,
        )
        return selection, features
    raise NotImplementedError(f"method {method!r} is not wired into the model side")


def prune_items(
    items: Sequence[ImageInput],
    settings: Sequence[ScriptSettings | None],
    ctx: PruneContext,
    *,
    kept_indices: list | None = None,
) -> list[torch.Tensor]:
    """n images, their settings -> n x [K_i, D] LLM-space rows, K_i = kept_count(N_i, .).

    Kept rows come in `Selection.keep`'s order (original order, except where
    `reference="code"` reproduces a code that passes another order: PruMerge+), extra
    tokens (TRIM's aggregate, PruMerge+'s remainder) follow them. Items whose settings
    keep every token get all their tokens (the given `tokens` tensor itself when there is
    one). If `kept_indices` is a list, it receives each item's kept token indices
    (LongTensor [K_keep], row i of the output is token `kept_indices[i]`; None for an
    unpruned item), e.g. to give kept tokens their original positions.
    """
    out: list[torch.Tensor | None] = [None] * len(items)
    if kept_indices is not None:
        kept_indices[:] = [None] * len(items)
    groups: dict[tuple[int, ScriptSettings], list[int]] = {}
    plain: list[int] = []
    for i, (item, cfg) in enumerate(zip(items, settings, strict=True)):
        n = item.num_tokens
        if cfg is not None and kept_count(n, cfg) < n:
            groups.setdefault((n, cfg), []).append(i)
        else:
            plain.append(i)
    for i in plain:
        item = items[i]
        if item.tokens is not None:
            out[i] = item.tokens
        elif ctx.project is not None:
            out[i] = ctx.project(item.features)
        else:
            raise RuntimeError("an ImageInput without tokens needs PruneContext.project")

    for (n, cfg), idxs in groups.items():
        k = kept_count(n, cfg)
        group = _Group([items[i] for i in idxs], cfg, ctx)
        with selection_threads(group.items[0].device):
            selection, source = _select(group, k)
            pruned = apply_selection(source, selection)
        if cfg.method in VISION_SPACE_METHODS:
            pruned = _project(ctx, pruned)
        if pruned.shape[1] != k:
            raise RuntimeError(f"{cfg.method} returned {pruned.shape[1]} tokens, promised {k}")
        for row, i in enumerate(idxs):
            out[i] = pruned[row]
        if kept_indices is not None:
            for row, i in enumerate(idxs):
                kept_indices[i] = selection.keep[row]
        iqr = selection.info.get("iqr_count")
        if iqr is not None and logger.isEnabledFor(logging.DEBUG):  # tolist() syncs a GPU
            logger.debug(
                "%s: IQR rule would keep %s of %d tokens per image (budget %d)",
                cfg.method,
                iqr.tolist(),
                n,
                k,
            )
        if os.environ.get(RECORD_ENV) == "1":
            _record(group, selection, k)
        logger.debug("pruned %d item(s) %d -> %d tokens with %s", len(idxs), n, k, cfg.method)
    return out  # type: ignore[return-value]


def _project(ctx: PruneContext, features: torch.Tensor) -> torch.Tensor:
    if ctx.project is None:
        raise RuntimeError("vision-space methods need PruneContext.project (the projector)")
    return ctx.project(features)


def _record(group: _Group, selection: Selection, k: int) -> None:
    extra = 0 if selection.extra is None else selection.extra.shape[1]
    iqr = selection.info.get("iqr_count")
    for row, item in enumerate(group.items):
        _recent.append(
            {
                "method": group.cfg.method,
                "relevance": group.cfg.relevance,
                "reference": group.cfg.reference,
                "num_tokens": item.num_tokens,
                "kept": k,
                "keep": selection.keep[row].tolist(),
                "merged": selection.kept_values is not None,
                "extra": extra,
                "iqr_count": None if iqr is None else int(iqr[row]),
                "query": item.query_ids.tolist() if item.query_ids is not None else [],
                "query_text": item.query_text,
            }
        )
