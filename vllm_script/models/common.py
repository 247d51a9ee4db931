"""What every architecture's processor and model subclass share.

Processor side (front-end process): resolve settings per request, put the resolved
settings and the question's token ids into the processor kwargs (so they are part of
the multimodal hash: processor cache, encoder cache and prefix cache never reuse a
selection made for other settings or another question), emit `kept_count` placeholders,
and pass both to the model as per-item fields. For `relevance="clip"` the question's ids
are also decoded with the LLM's tokenizer into text (a third per-item field) for the
CLIP tokenizer; the text is a deterministic function of the hashed ids.

Per-request kwargs: with the plugin configured and `request_kwargs: "script-only"` (the
default), the processors refuse every per-request processor kwarg but `script` with a
`SettingsError` (a 400 on the server), before anything is processed; kwargs the operator
set server-wide (`--mm-processor-kwargs`) are merged later by vLLM and still apply.

Model side (worker): pop those fields, run the in-tree encoder, prune per item. An
architecture that can give pre-projector features (needed by `trim`, `prumerge+` and
CLIP relevance) overrides `script_encode`; otherwise only the LLM-space methods work on
what the in-tree `embed_multimodal` returns. With a server-wide `clip_path` the CLIP
text tower is loaded once per worker at model init, and a missing checkpoint or one
whose vision width differs from the model's vision tower stops the engine at start-up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property

import torch

from vllm_script.config import (
    METHODS,
    ScriptSettings,
    SettingsError,
    kept_count,
    parse_server_settings,
    resolve_request_settings,
)
from vllm_script.metrics import record_image
from vllm_script.pruning import VISION_SPACE_METHODS, ImageInput, PruneContext, prune_items

logger = logging.getLogger("vllm_script")

SETTINGS_KEY = "script"  # in hf_overrides and in mm_processor_kwargs
QUERY_KEY = "script_query"  # added by the processor: the question's token ids
FIELD_SETTINGS = "script_settings"  # per-item field: resolved settings as JSON bytes
FIELD_QUERY = "script_query_ids"  # per-item field: question token ids
FIELD_QUERY_TEXT = "script_query_text"  # per-item field: question text (UTF-8), clip only
MAX_QUERY_TOKENS = 1024  # the last ones are kept: the question usually ends the prompt


def server_settings_of(hf_config: object) -> ScriptSettings | None:
    return parse_server_settings(getattr(hf_config, SETTINGS_KEY, None))


def encode_settings(settings: ScriptSettings) -> torch.Tensor:
    return torch.tensor(list(settings.to_json().encode()), dtype=torch.uint8)


def decode_settings(field: torch.Tensor) -> ScriptSettings:
    return ScriptSettings.from_json(bytes(field.tolist()).decode())


def encode_text(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def decode_text(field: torch.Tensor) -> str:
    return bytes(field.tolist()).decode()


def field_name(base: str, modality: str) -> str:
    """Per-item field names: images use the base names, other modalities a suffix."""
    return base if modality == "image" else f"{base}_{modality}"


def settings_from_kwargs(hf_processor_mm_kwargs: Mapping[str, object]) -> ScriptSettings | None:
    """The resolved settings `apply()` stored in the kwargs (None: no pruning)."""
    raw = hf_processor_mm_kwargs.get(SETTINGS_KEY)
    return None if raw is None else ScriptSettings.from_json(str(raw))


_profiling = threading.local()


def profiling() -> bool:
    """True while this thread processes vLLM's start-up / profiling dummy inputs."""
    return getattr(_profiling, "active", False)


class RequestKwargsGuardMixin:
    """Mix in before an in-tree `BaseMultiModalProcessor` subclass: the per-request kwargs
    rule (`request_kwargs`) and the marking of vLLM's dummy (profiling) inputs.

    Server-wide `--mm-processor-kwargs` never reach `apply()`'s inputs (vLLM merges them
    when it calls the HF processor), so only what the request sent is checked here.
    """

    @cached_property
    def script_server_settings(self) -> ScriptSettings | None:
        return server_settings_of(self.info.get_hf_config())

    def script_guard_request_kwargs(self, request_kwargs: Mapping[str, object]) -> None:
        """Under `request_kwargs: "script-only"`, refuse any per-request kwarg but `script`."""
        server = self.script_server_settings
        if server is None or server.request_kwargs == "all" or profiling():
            return
        others = sorted(str(key) for key in request_kwargs if key != SETTINGS_KEY)
        if others:
            named = ", ".join(repr(key) for key in others)
            raise SettingsError(
                f"request setting (mm_processor_kwargs): processor kwarg {named} not allowed "
                f"per request on this server; allowed: only 'script' (server setting "
                f"'script.request_kwargs' = {server.request_kwargs!r}; other processor kwargs "
                "can be set server-wide with --mm-processor-kwargs)"
            )

    def get_dummy_mm_inputs(self, *args, **kwargs):
        # vLLM's start-up warm-up and memory profiling: not a user's request, so neither
        # counted in the metrics nor checked against the per-request kwargs rule
        previous = profiling()
        _profiling.active = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            _profiling.active = previous


class PassThroughProcessorMixin(RequestKwargsGuardMixin):
    """For checkpoints the plugin serves but does not prune (e.g. Pixtral-HF under the
    LLaVA architecture): the per-request kwargs rule holds, and a per-request `script`
    setting is validated (bad values get the usual 400) and then ignored."""

    def apply(self, inputs, timing_ctx):
        self.script_guard_request_kwargs(inputs.hf_processor_mm_kwargs)
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        request_raw = kwargs.pop(SETTINGS_KEY, None)
        if request_raw is not None:
            resolve_request_settings(self.script_server_settings, request_raw)
            inputs = replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)


class ScriptProcessorMixin(RequestKwargsGuardMixin):
    """Mix in before the in-tree `BaseMultiModalProcessor` subclass."""

    #: modalities whose items are pruned
    script_modalities: tuple[str, ...] = ("image",)
    #: whether the model side gives pre-projector features (trim, prumerge+, clip)
    script_vision_space = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.script_check_supported(self.script_server_settings, "server setting (hf_overrides)")
        # Check the server settings when the front-end builds the processor (before the
        # engine core starts), so a bad setting or CLIP checkpoint stops start-up with
        # its message in the front-end's traceback; the worker checks again on load.
        settings = self.script_server_settings
        if settings is not None and settings.clip_path is not None:
            from vllm_script.clip_text import ClipCheckpointError, check_clip_checkpoint

            try:
                check_clip_checkpoint(settings.clip_path, self.script_clip_vision_width())
            except (ClipCheckpointError, NotImplementedError) as exc:
                raise ClipCheckpointError(
                    f"vllm-script refuses to start: 'script.clip_path' = "
                    f"{settings.clip_path!r}: {exc}"
                ) from exc

    def script_clip_vision_width(self) -> int:
        """Width of the features CLIP relevance projects (or raise NotImplementedError)."""
        raise NotImplementedError("this architecture does not support relevance='clip'")

    @cached_property
    def _script_dropped_ids(self) -> frozenset[int]:
        tokenizer = self.info.get_tokenizer()
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids.update(self.script_placeholder_ids())
        return frozenset(ids)

    def script_placeholder_ids(self) -> Sequence[int]:
        """Token ids of the modality's placeholders (never part of the question)."""
        raise NotImplementedError

    def script_query_ids(self, prompt: Sequence[int]) -> tuple[int, ...]:
        """Prompt token ids -> the question's ids (special and placeholder tokens dropped)."""
        dropped = self._script_dropped_ids
        ids = tuple(int(t) for t in prompt if int(t) not in dropped)
        return ids[-MAX_QUERY_TOKENS:]

    def script_check_supported(self, settings: ScriptSettings | None, where: str) -> None:
        """Refuse settings this architecture's model side cannot carry out."""
        if settings is None or self.script_vision_space:
            return
        arch = type(self).__name__.removeprefix("Script").removesuffix("Processor")
        if settings.method in VISION_SPACE_METHODS:
            raise SettingsError(
                f"{where}: invalid value for 'script.method': {settings.method!r}; "
                f"{arch} supports {sorted(m for m in METHODS if m not in VISION_SPACE_METHODS)}"
                " (trim and prumerge+ need LLaVA-1.5's pre-projector features)"
            )
        if settings.relevance == "clip":
            raise SettingsError(
                f"{where}: invalid value for 'script.relevance': 'clip'; {arch} supports 'llm'"
            )

    def apply(self, inputs, timing_ctx):
        self.script_guard_request_kwargs(inputs.hf_processor_mm_kwargs)
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        request_raw = kwargs.pop(SETTINGS_KEY, None)
        kwargs.pop(QUERY_KEY, None)
        settings = resolve_request_settings(self.script_server_settings, request_raw)
        if request_raw is not None:
            self.script_check_supported(settings, "request setting (mm_processor_kwargs)")
        if settings is not None:
            kwargs[SETTINGS_KEY] = settings.to_json()
            if settings.needs_query:
                kwargs[QUERY_KEY] = list(self.script_query_ids(inputs.prompt))
        inputs = replace(inputs, hf_processor_mm_kwargs=kwargs)
        out = super().apply(inputs, timing_ctx)
        # counted here, not where placeholders are made: cache hits skip that step;
        # vLLM's start-up dummy inputs are not a user's images
        if not profiling():
            self.script_record_metrics(inputs, settings)
        return out

    def script_record_metrics(self, inputs, settings: ScriptSettings | None) -> None:
        """Count every item of the pruned modalities in the Prometheus counters."""
        method = settings.method if settings is not None else "none"
        try:
            for modality in self.script_modalities:
                items = inputs.mm_data_items.get(modality)
                for i in range(len(items) if items is not None else 0):
                    n = self.script_num_tokens(inputs.mm_data_items, modality, i)
                    if n is not None:
                        record_image(method, n, kept_count(n, settings))
        except Exception:  # metrics never fail a request
            logger.warning("vllm-script: could not count visual tokens", exc_info=True)

    def script_num_tokens(self, mm_items, modality: str, item_idx: int) -> int | None:
        """Unpruned visual-token count of one item (None: not counted)."""
        return None

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        # Profile at the largest per-request budget allowed (default: no pruning), not at
        # the server's default budget, so the encoder cache fits every allowed request.
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        server = self.script_server_settings
        if server is not None and server.max_budget is not None:
            profile = {"budget": server.max_budget}
        else:
            profile = {"method": "none"}
        return replace(inputs, hf_processor_mm_kwargs={SETTINGS_KEY: profile})

    def _call_hf_processor(self, hf_data, hf_kwargs):
        hf_kwargs = dict(hf_kwargs)
        raw_settings = hf_kwargs.pop(SETTINGS_KEY, None)
        query = hf_kwargs.pop(QUERY_KEY, None) or []
        outputs = super()._call_hf_processor(hf_data, hf_kwargs)
        return self.script_add_fields(outputs, raw_settings, query)

    def script_add_fields(self, outputs, raw_settings: object, query: Sequence[int]):
        """Add the per-item fields (settings, question ids and text) to HF outputs."""
        if raw_settings is None:
            return outputs
        settings = ScriptSettings.from_json(str(raw_settings))
        for modality in self.script_modalities:
            num_items = self.script_num_items(outputs, modality)
            self.script_add_item_fields(outputs, modality, num_items, settings, query)
        return outputs

    def script_add_item_fields(
        self, outputs, modality: str, num_items: int, settings: ScriptSettings, query
    ) -> None:
        """Attach one modality's per-item fields (settings, question ids and text)."""
        if not num_items:
            return
        text = self.script_query_text(query) if settings.relevance == "clip" else ""
        outputs[field_name(FIELD_SETTINGS, modality)] = [
            encode_settings(settings) for _ in range(num_items)
        ]
        outputs[field_name(FIELD_QUERY, modality)] = [
            torch.tensor(query, dtype=torch.long) for _ in range(num_items)
        ]
        outputs[field_name(FIELD_QUERY_TEXT, modality)] = [
            encode_text(text) for _ in range(num_items)
        ]

    def script_query_text(self, query: Sequence[int]) -> str:
        """The question's ids -> text for the CLIP tokenizer (the LLM tokenizer's decode)."""
        if not query:
            return ""
        return self.info.get_tokenizer().decode(list(query), skip_special_tokens=True).strip()

    def script_num_items(self, hf_outputs, modality: str) -> int:
        """Number of items of `modality` in the HF processor's outputs."""
        raise NotImplementedError

    def script_fields_config(self):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        return {
            field_name(base, modality): MultiModalFieldConfig.batched(modality)
            for modality in self.script_modalities
            for base in (FIELD_SETTINGS, FIELD_QUERY, FIELD_QUERY_TEXT)
        }


def _unbatch(field: object) -> list[torch.Tensor]:
    if isinstance(field, torch.Tensor):
        return list(field.unbind(0))
    return list(field)  # type: ignore[arg-type]


class ScriptModelMixin:
    """Mix in before the in-tree model class; prunes what `embed_multimodal` returns.

    Subclasses call `script_init(vllm_config)` at the end of `__init__`, and may
    override `script_encode` (pre-projector features) and `script_clip_vision_width`
    (CLIP relevance support).
    """

    script_clip = None  # ClipRelevance when the server set clip_path

    def script_init(self, vllm_config: object) -> None:
        hf_config = vllm_config.model_config.hf_config
        try:
            self.script_server_settings = server_settings_of(hf_config)
        except SettingsError as exc:
            raise SettingsError(f"vllm-script refuses to start: {exc}") from exc
        if self.script_server_settings is None:
            logger.info("vllm-script: loaded; no server-wide 'script' setting (pruning off)")
            return
        logger.info(
            "vllm-script: server-wide pruning settings %s", self.script_server_settings.to_json()
        )
        if self.script_server_settings.clip_path is not None:
            self.script_clip = self._script_load_clip(
                self.script_server_settings.clip_path, vllm_config.device_config.device
            )
        self._script_warm_up(vllm_config)

    def _script_warm_up(self, vllm_config: object) -> None:
        """Choose the selection backend and compile / run its kernels once (vllm_script.warmup):
        no request pays a JIT compile, and a kernel that fails stops start-up with a
        message naming it."""
        from vllm_script import ops
        from vllm_script.warmup import warm_up

        settings = self.script_server_settings
        ops.set_default_backend(None if settings.backend == "auto" else settings.backend)
        model_config = vllm_config.model_config
        hidden = model_config.hf_config.get_text_config().hidden_size
        device = torch.device(vllm_config.device_config.device)
        timings = warm_up(device, model_config.dtype, hidden)
        if timings:
            logger.info(
                "vllm-script: selection backend %s on %s; kernels compiled and run once in "
                "%.1f s (%s)",
                ops.default_backend(),
                device,
                sum(t for _, t in timings),
                ", ".join(f"{name} {t:.1f} s" for name, t in timings),
            )

    def _script_load_clip(self, path: str, device: object):
        """Load and check the CLIP checkpoint (text tower + projections) once per worker.

        Kept in fp32 (it embeds one short question per request and N patches per image).
        Any problem raises `ClipCheckpointError` naming the path (and both widths on a
        width mismatch), so the engine refuses to start.
        """
        from vllm_script.clip_text import ClipCheckpointError, load_clip_relevance

        try:
            width = self.script_clip_vision_width()
            with torch.device("cpu"):
                clip = load_clip_relevance(path, width, device="cpu", dtype=torch.float32)
        except (ClipCheckpointError, NotImplementedError) as exc:
            raise ClipCheckpointError(
                f"vllm-script refuses to start: 'script.clip_path' = {path!r}: {exc}"
            ) from exc
        for module in (clip.text_model, clip.text_projection, clip.visual_projection):
            module.to(device)
        clip.post_layernorm.to(device)
        logger.info(
            "vllm-script: CLIP relevance loaded from %s (vision width %d, embed dim %d)",
            path,
            clip.vision_width,
            clip.embed_dim,
        )
        return clip

    def script_clip_vision_width(self) -> int:
        """Width of the pre-projector features CLIP relevance projects (or raise)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support relevance='clip' (no CLIP features)"
        )

    def script_encode(self, kwargs: dict, settings: list) -> list[ImageInput] | None:
        """The in-tree inputs -> one `ImageInput` per item, or None (LLM-space tokens only).

        `settings` (per item, None = unpruned) tells what the methods in this batch need.
        """
        return None

    def script_project(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    #: modalities the processor attaches fields to (see ScriptProcessorMixin)
    script_modalities: tuple[str, ...] = ("image",)

    def script_pop_fields(self, kwargs: dict) -> tuple[object, object, object]:
        """Pop every modality's fields; vLLM batches one modality per call."""
        found = (None, None, None)
        for modality in self.script_modalities:
            fields = tuple(
                kwargs.pop(field_name(base, modality), None)
                for base in (FIELD_SETTINGS, FIELD_QUERY, FIELD_QUERY_TEXT)
            )
            if fields[0] is not None:
                found = fields
        return found

    def embed_multimodal(self, **kwargs: object):
        settings_field, query_field, text_field = self.script_pop_fields(kwargs)
        if settings_field is None:
            return super().embed_multimodal(**kwargs)
        settings = [decode_settings(f) for f in _unbatch(settings_field)]
        num = len(settings)
        queries = _unbatch(query_field) if query_field is not None else [None] * num
        texts = [decode_text(f) for f in _unbatch(text_field)] if text_field is not None else []
        texts += [""] * (num - len(texts))
        items = self.script_encode(kwargs, settings)
        project = self.script_project
        if items is None:
            embeds = super().embed_multimodal(**kwargs)
            embeds = list(embeds.unbind(0)) if isinstance(embeds, torch.Tensor) else list(embeds)
            items = [ImageInput(tokens=e) for e in embeds]
            project = None
        if len(items) != num:
            raise RuntimeError(f"vllm-script: {len(items)} images but {num} settings fields")
        for item, query, text in zip(items, queries, texts, strict=True):
            item.query_ids = query
            item.query_text = text
        embed_tokens = self.get_language_model().embed_input_ids
        device = next(self.parameters()).device

        def embed_query(ids: torch.Tensor) -> torch.Tensor:
            return embed_tokens(ids.to(device, torch.long))

        ctx = PruneContext(embed_query=embed_query, project=project, clip=self.script_clip)
        kept: list = []
        rows = prune_items(items, settings, ctx, kept_indices=kept)
        return self.script_finish(rows, kept, kwargs)

    def script_finish(self, rows: list[torch.Tensor], kept: list, kwargs: dict):
        """Last step of `embed_multimodal`: rows per item, their kept indices (None if
        unpruned) and the in-tree inputs. M-RoPE models attach original positions here."""
        return rows
