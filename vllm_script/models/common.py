"""What every architecture's processor and model subclass share.

Processor side (front-end process): resolve settings per request, put the resolved
settings and the question's token ids into the processor kwargs (so they are part of
the multimodal hash: processor cache, encoder cache and prefix cache never reuse a
selection made for other settings or another question), emit `kept_count` placeholders,
and pass both to the model as per-item fields.

Model side (worker): pop those fields, run the in-tree encoder, prune per item.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property

import torch

from vllm_script.config import (
    ScriptSettings,
    SettingsError,
    parse_server_settings,
    resolve_request_settings,
)
from vllm_script.pruning import prune_items

logger = logging.getLogger("vllm_script")

SETTINGS_KEY = "script"  # in hf_overrides and in mm_processor_kwargs
QUERY_KEY = "script_query"  # added by the processor: the question's token ids
FIELD_SETTINGS = "script_settings"  # per-item field: resolved settings as JSON bytes
FIELD_QUERY = "script_query_ids"  # per-item field: question token ids
MAX_QUERY_TOKENS = 1024  # the last ones are kept: the question usually ends the prompt


def server_settings_of(hf_config: object) -> ScriptSettings | None:
    return parse_server_settings(getattr(hf_config, SETTINGS_KEY, None))


def encode_settings(settings: ScriptSettings) -> torch.Tensor:
    return torch.tensor(list(settings.to_json().encode()), dtype=torch.uint8)


def decode_settings(field: torch.Tensor) -> ScriptSettings:
    return ScriptSettings.from_json(bytes(field.tolist()).decode())


def settings_from_kwargs(hf_processor_mm_kwargs: Mapping[str, object]) -> ScriptSettings | None:
    """The resolved settings `apply()` stored in the kwargs (None: no pruning)."""
    raw = hf_processor_mm_kwargs.get(SETTINGS_KEY)
    return None if raw is None else ScriptSettings.from_json(str(raw))


class ScriptProcessorMixin:
    """Mix in before the in-tree `BaseMultiModalProcessor` subclass."""

    #: modality whose items are pruned
    script_modality = "image"

    @cached_property
    def script_server_settings(self) -> ScriptSettings | None:
        return server_settings_of(self.info.get_hf_config())

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

    def apply(self, inputs, timing_ctx):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        request_raw = kwargs.pop(SETTINGS_KEY, None)
        kwargs.pop(QUERY_KEY, None)
        settings = resolve_request_settings(self.script_server_settings, request_raw)
        if settings is not None:
            kwargs[SETTINGS_KEY] = settings.to_json()
            if settings.needs_query:
                kwargs[QUERY_KEY] = list(self.script_query_ids(inputs.prompt))
        inputs = replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)

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
        if raw_settings is None:
            return outputs
        settings = ScriptSettings.from_json(str(raw_settings))
        num_items = self.script_num_items(outputs)
        outputs[FIELD_SETTINGS] = [encode_settings(settings) for _ in range(num_items)]
        outputs[FIELD_QUERY] = [torch.tensor(query, dtype=torch.long) for _ in range(num_items)]
        return outputs

    def script_num_items(self, hf_outputs) -> int:
        """Number of items of `script_modality` in the HF processor's outputs."""
        raise NotImplementedError

    def script_fields_config(self):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        return {
            FIELD_SETTINGS: MultiModalFieldConfig.batched(self.script_modality),
            FIELD_QUERY: MultiModalFieldConfig.batched(self.script_modality),
        }


def _unbatch(field: object) -> list[torch.Tensor]:
    if isinstance(field, torch.Tensor):
        return list(field.unbind(0))
    return list(field)  # type: ignore[arg-type]


class ScriptModelMixin:
    """Mix in before the in-tree model class; prunes what `embed_multimodal` returns."""

    def script_init(self, hf_config: object) -> None:
        try:
            self.script_server_settings = server_settings_of(hf_config)
        except SettingsError as exc:
            raise SettingsError(f"vllm-script refuses to start: {exc}") from exc
        if self.script_server_settings is None:
            logger.info("vllm-script: loaded; no server-wide 'script' setting (pruning off)")
        else:
            logger.info(
                "vllm-script: server-wide pruning settings %s",
                self.script_server_settings.to_json(),
            )

    def embed_multimodal(self, **kwargs: object):
        settings_field = kwargs.pop(FIELD_SETTINGS, None)
        query_field = kwargs.pop(FIELD_QUERY, None)
        embeds = super().embed_multimodal(**kwargs)
        if settings_field is None:
            return embeds
        items = list(embeds.unbind(0)) if isinstance(embeds, torch.Tensor) else list(embeds)
        settings = [decode_settings(f) for f in _unbatch(settings_field)]
        queries = _unbatch(query_field) if query_field is not None else [None] * len(items)
        embed_tokens = self.get_language_model().embed_input_ids

        def embed_query(ids: torch.Tensor) -> torch.Tensor:
            return embed_tokens(ids.to(items[0].device, torch.long))

        return prune_items(items, settings, queries, embed_query)
