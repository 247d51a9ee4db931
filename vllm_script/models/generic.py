"""One adapter for the vLLM multimodal models whose LLM uses ordinary 1-D positions.

Such a model puts each image into the prompt as its processor's replacement: token ids
of which the embedding tokens (vLLM's `PromptUpdateDetails.is_embed`) receive, in order,
the N rows that `embed_multimodal` returns for the image; text tokens may surround them
(`<start_of_image>`, `<img>`, newlines). Pruning an image to K of its rows needs the
same two steps for every such model:

- processor (front-end): the in-tree replacement with its N embedding tokens replaced by
  K = `kept_count(N, settings)` of the same token, the text before and after them kept.
  N is counted from the in-tree replacement itself, so it is vLLM's own count.
- model (worker): the in-tree `embed_multimodal`, then K of each item's N rows
  (`ScriptModelMixin`; the LLM-space methods with relevance "llm").

Positions need nothing: the LLM numbers the shorter prompt 0, 1, 2, ... as usual (and a
model with bidirectional attention over an image, as Gemma 3, gets it over the kept
tokens' range from vLLM's placeholder ranges).

An image whose embedding tokens form several runs separated by text (Gemma 3's
pan-and-scan crops, each introduced by text; Pixtral's per-row `[IMG_BREAK]`) is refused
with a per-request error: which rows survive is known only after the encoder, so that
text cannot stay in place.

Per architecture there is only a row of `ARCHITECTURES`; the classes are made from it
on first use (`ScriptGemma3ForConditionalGeneration`, ...) and registered as lazy
"vllm_script.models.generic:<class>" strings by `vllm_script.plugin`.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import replace as dc_replace

import torch

from vllm_script.config import SettingsError, kept_count
from vllm_script.models.common import (
    QUERY_KEY,
    SETTINGS_KEY,
    ScriptModelMixin,
    ScriptProcessorMixin,
    settings_from_kwargs,
)

CLASS_PREFIX = "Script"


@dataclass(frozen=True)
class GenericRow:
    """One architecture the generic adapter prunes.

    arch:       the architecture name in the checkpoint's config (vLLM's registry key).
    model:      "module:Class" of vLLM's in-tree model class for it.
    """

    arch: str
    model: str

    @property
    def short_name(self) -> str:
        return self.arch.removesuffix("ForConditionalGeneration")

    @property
    def class_name(self) -> str:
        return CLASS_PREFIX + self.arch


ARCHITECTURES: dict[str, GenericRow] = {
    row.arch: row
    for row in (
        # 256 tokens per image (SigLIP 896 px, pooled 4x4); pan-and-scan crops are
        # separate runs with text between them, refused when pruning
        GenericRow(
            "Gemma3ForConditionalGeneration",
            "vllm.model_executor.models.gemma3_mm:Gemma3ForConditionalGeneration",
        ),
        # 256 tokens per 448-px tile, 1-12 tiles + a thumbnail, all one run: the budget
        # is per image, over all its tiles; videos are not pruned
        GenericRow(
            "InternVLForConditionalGeneration",
            "vllm.model_executor.models.interns1:InternS1ForConditionalGeneration",
        ),
        # base crop + any-resolution tiles + one newline token per row, one run; videos
        # are not pruned
        GenericRow(
            "LlavaOnevisionForConditionalGeneration",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration",
        ),
    )
}


def embed_runs(mask: Sequence[bool]) -> list[tuple[int, int]]:
    """[L] embedding mask -> the (start, end) of each run of True, in order."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate(mask):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


@dataclass(frozen=True)
class _FixedMask:
    """`is_embed` of a pruned replacement: the mask computed with it."""

    mask: tuple[bool, ...]

    def __call__(self, full: list[int]) -> torch.Tensor:
        return torch.tensor(self.mask, dtype=torch.bool)


def shrink_replacement(
    full: Sequence[int], mask: Sequence[bool], keep: int, *, where: str
) -> tuple[list[int], tuple[bool, ...]]:
    """A replacement's token ids and embedding mask -> the same with `keep` embedding tokens.

    The run of embedding tokens becomes `keep` copies of their token id; the text before
    and after it is kept. Several runs (text between them): SettingsError.
    """
    runs = embed_runs(mask)
    if not runs:
        raise RuntimeError(f"vllm-script: {where}: the image has no embedding tokens")
    if len(runs) > 1:
        sizes = [end - start for start, end in runs]
        raise SettingsError(
            f"{where}: this image's {sum(sizes)} visual tokens come in {len(runs)} runs "
            f"separated by text ({sizes}), which vllm-script cannot prune; send it with "
            "'script': {'method': 'none'} (or turn off the option that splits it, e.g. "
            "do_pan_and_scan)"
        )
    embed_ids = {int(full[i]) for i, flag in enumerate(mask) if flag}
    if len(embed_ids) != 1:
        raise RuntimeError(
            f"vllm-script: {where}: the image's embedding tokens have several ids "
            f"{sorted(embed_ids)}; the generic adapter repeats one"
        )
    token = embed_ids.pop()
    ((first, last),) = runs
    ids = list(full[:first]) + [token] * keep + list(full[last:])
    new_mask = (False,) * first + (True,) * keep + (False,) * (len(full) - last)
    return ids, new_mask


def _content_of(update, item_idx: int):
    """(token ids, embedding mask) of `update` for one item, as vLLM resolves it."""
    from vllm.multimodal.processing import PromptUpdateDetails

    content = update.content
    if callable(content):
        content = content(item_idx)
    if not isinstance(content, PromptUpdateDetails):
        content = PromptUpdateDetails.from_seq(content)
    full = list(content.full)
    if content.is_embed is None:
        mask = [True] * len(full)
    else:
        mask = [bool(x) for x in content.is_embed(full).tolist()]
    return content, full, mask


class GenericProcessorMixin(ScriptProcessorMixin):
    """Processor side of a `GenericRow`: wraps the in-tree prompt updates and outputs."""

    script_row: GenericRow  # set on each class made from a row
    _script_local = threading.local()  # this thread's per-item counts (for the metrics)

    def script_placeholder_ids(self) -> Sequence[int]:
        """Every token id the config names (image, boi / eoi, video, ...): none of them
        is part of the question."""
        ids: set[int] = set()
        config = self.info.get_hf_config()
        for cfg in (config, getattr(config, "text_config", None)):
            for key, value in (vars(cfg) if cfg is not None else {}).items():
                if key.endswith(("_token_index", "_token_id")) and isinstance(value, int):
                    ids.add(value)
        return sorted(ids)

    def script_num_items(self, hf_outputs, modality: str) -> int:
        raise NotImplementedError("the generic adapter counts items in _apply_hf_processor_main")

    def script_num_tokens(self, mm_items, modality: str, item_idx: int) -> int | None:
        counts = getattr(self._script_local, "counts", None)
        return None if counts is None else counts.get((modality, item_idx))

    def apply(self, inputs, timing_ctx):
        self._script_local.counts = {}
        try:
            return super().apply(inputs, timing_ctx)
        finally:
            self._script_local.counts = None

    @staticmethod
    def _script_strip(kwargs: Mapping[str, object]) -> dict[str, object]:
        return {k: v for k, v in kwargs.items() if k not in (SETTINGS_KEY, QUERY_KEY)}

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        from vllm.multimodal.parse import ImageProcessorItems

        settings = settings_from_kwargs(hf_kwargs)
        query = hf_kwargs.get(QUERY_KEY) or []
        outputs = super()._apply_hf_processor_main(mm_items, self._script_strip(hf_kwargs))
        images = mm_items.get("image")
        if settings is None or not isinstance(images, ImageProcessorItems) or not len(images):
            return outputs
        self.script_add_item_fields(outputs, "image", len(images), settings, query)
        return outputs

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(
            super()._get_mm_fields_config(hf_inputs, self._script_strip(hf_processor_mm_kwargs))
        )
        fields.update(self.script_fields_config())
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.parse import ImageProcessorItems
        from vllm.multimodal.processing import PromptUpdateDetails

        updates = super()._get_prompt_updates(
            mm_items, self._script_strip(hf_processor_mm_kwargs), out_mm_kwargs
        )
        if not isinstance(mm_items.get("image"), ImageProcessorItems):
            return updates  # precomputed image embeddings are passed through unpruned
        settings = settings_from_kwargs(hf_processor_mm_kwargs)
        row, local = self.script_row, self._script_local

        def pruned(update):
            def content(item_idx: int):
                original, full, mask = _content_of(update, item_idx)
                n = sum(mask)
                counts = getattr(local, "counts", None)
                if counts is not None:
                    counts[("image", item_idx)] = n
                k = kept_count(n, settings)
                if k == n:
                    return original
                ids, new_mask = shrink_replacement(
                    full,
                    mask,
                    k,
                    where=f"{row.short_name} image {item_idx}",
                )
                if all(new_mask):
                    return PromptUpdateDetails.from_seq(ids)
                return PromptUpdateDetails(full=ids, is_embed=_FixedMask(new_mask))

            field = "replacement" if hasattr(update, "replacement") else "insertion"
            return dc_replace(update, **{field: content})

        return [pruned(u) if u.modality == "image" else u for u in updates]


class GenericModelMixin(ScriptModelMixin):
    """Model side of a `GenericRow`: `ScriptModelMixin` on the in-tree model."""

    script_row: GenericRow

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.script_init(vllm_config)


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


_processor_classes: dict[tuple[str, type], type] = {}


def _processor_class(row: GenericRow, base: type) -> type:
    key = (row.arch, base)
    if key not in _processor_classes:
        name = f"{CLASS_PREFIX}{row.short_name}Processor"
        namespace = {"script_row": row, "__module__": __name__, "__qualname__": name}
        _processor_classes[key] = type(name, (GenericProcessorMixin, base), namespace)
    return _processor_classes[key]


def make_model_class(row: GenericRow) -> type:
    """The pruning subclass of `row`'s in-tree model, with its processor registered."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    base = _load(row.model)
    factories = getattr(base, "_processor_factory", None)
    if factories is None:
        raise RuntimeError(f"vllm-script: {row.model} has no registered multimodal processor")

    def build_processor(info, dummy_inputs):
        inner = factories.processor
        if not isinstance(inner, type):  # a factory function: subclass what it builds
            inner = type(inner(info, dummy_inputs))
        return _processor_class(row, inner)(info, dummy_inputs)

    namespace = {"script_row": row, "__module__": __name__, "__qualname__": row.class_name}
    cls = type(row.class_name, (GenericModelMixin, base), namespace)
    return MULTIMODAL_REGISTRY.register_processor(
        build_processor, info=factories.info, dummy_inputs=factories.dummy_inputs
    )(cls)


_classes: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """`ScriptGemma3ForConditionalGeneration` etc., made from their row on first use."""
    arch = name.removeprefix(CLASS_PREFIX)
    if not name.startswith(CLASS_PREFIX) or arch not in ARCHITECTURES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _classes:
        _classes[name] = make_model_class(ARCHITECTURES[arch])
    return _classes[name]


def registrations() -> dict[str, str]:
    """Architecture -> lazy "module:Class" string, for `ModelRegistry.register_model`."""
    return {arch: f"{__name__}:{row.class_name}" for arch, row in ARCHITECTURES.items()}
