"""`request_kwargs`: which per-request processor kwargs the plugin's processors accept.

Unit tests of the rule on a stand-in processor (no engine), a check that every processor
class in `vllm_script.models` carries the rule, then the OpenAI server on the tiny
Qwen2.5-VL checkpoint, where processor kwargs visibly change the token count: an image's
pixels are bounded by `max_pixels`, so a 224x224 image is (224/28)^2 = 64 tokens at the
checkpoint's default and (112/28)^2 = 16 tokens with `max_pixels` = 112 * 112. Both
servers (one per `request_kwargs` value, one at a time) set `max_pixels` = 112 * 112
server-wide with `--mm-processor-kwargs`, which must apply in both.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from server_utils import image_url

from vllm_script.config import REQUEST_KWARGS, SettingsError
from vllm_script.models.common import PassThroughProcessorMixin, RequestKwargsGuardMixin

# -- the rule on a stand-in processor (no vLLM engine) ------------------------------------


@dataclass
class Inputs:
    hf_processor_mm_kwargs: dict = field(default_factory=dict)


class InTreeProcessor:
    """Stands in for vLLM's processor: `apply` returns the kwargs it was given."""

    def __init__(self, server_settings: dict | None) -> None:
        config = (
            SimpleNamespace()
            if server_settings is None
            else SimpleNamespace(script=server_settings)
        )
        self.info = SimpleNamespace(get_hf_config=lambda: config)

    def apply(self, inputs, timing_ctx):
        return dict(inputs.hf_processor_mm_kwargs)

    def get_dummy_mm_inputs(self, kwargs: dict):
        return self.apply(Inputs(kwargs), None)


class PassThrough(PassThroughProcessorMixin, InTreeProcessor):
    pass


def test_script_only_is_the_default_and_refuses_other_kwargs_by_name():
    processor = PassThrough({"budget": 64})
    with pytest.raises(SettingsError) as info:
        processor.apply(Inputs({"do_resize": False, "do_center_crop": False}), None)
    message = str(info.value)
    assert "'do_center_crop', 'do_resize'" in message
    assert "'script.request_kwargs' = 'script-only'" in message
    assert "--mm-processor-kwargs" in message


def test_script_only_accepts_script_and_unpruned_processors_drop_it():
    processor = PassThrough({"budget": 64, "request_kwargs": "script-only"})
    assert processor.apply(Inputs({"script": {"budget": 32}}), None) == {}
    assert processor.apply(Inputs({}), None) == {}


def test_unpruned_processors_still_validate_the_script_setting():
    with pytest.raises(SettingsError, match=r"'script\.budget': 0"):
        PassThrough({"budget": 64}).apply(Inputs({"script": {"budget": 0}}), None)


def test_all_passes_every_kwarg_on():
    processor = PassThrough({"budget": 64, "request_kwargs": "all"})
    assert processor.apply(Inputs({"do_resize": False, "script": {}}), None) == {"do_resize": False}


def test_unconfigured_plugin_changes_nothing():
    processor = PassThrough(None)
    assert processor.apply(Inputs({"do_resize": False}), None) == {"do_resize": False}


def test_start_up_dummy_inputs_are_not_requests():
    processor = PassThrough({"budget": 64})
    assert processor.get_dummy_mm_inputs({"max_pixels": 1}) == {"max_pixels": 1}
    with pytest.raises(SettingsError):  # and the marking ends with the dummy inputs
        processor.apply(Inputs({"max_pixels": 1}), None)


def test_request_kwargs_is_server_only():
    from vllm_script.config import resolve_request_settings

    assert REQUEST_KWARGS == ("script-only", "all")
    with pytest.raises(SettingsError, match="set only server-wide"):
        resolve_request_settings(None, {"request_kwargs": "all"})


def test_every_processor_of_the_plugin_applies_the_rule():
    """Every multimodal processor class in vllm_script.models (new architectures too)."""
    from vllm.multimodal.processing import BaseMultiModalProcessor

    import vllm_script.models

    found = []
    for module_info in pkgutil.iter_modules(vllm_script.models.__path__):
        module = importlib.import_module(f"vllm_script.models.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BaseMultiModalProcessor):
                found.append(cls)
                assert issubclass(cls, RequestKwargsGuardMixin), cls
                # the rule runs first: before vLLM's own apply touches the kwargs
                mro = cls.__mro__
                assert mro.index(RequestKwargsGuardMixin) < mro.index(BaseMultiModalProcessor)
    names = {cls.__name__ for cls in found}
    assert {
        "ScriptLlavaProcessor",
        "ScriptLlavaNextProcessor",
        "ScriptQwen2_5_VLProcessor",
    } <= names
    assert "PassThroughPixtralHFProcessor" in names


# -- through the OpenAI server (Qwen2.5-VL) -----------------------------------------------

SERVER_WIDE_PIXELS = 112 * 112
SIDE = 224
TOKENS_SERVER_WIDE = (112 // 28) ** 2  # 16: the server-wide max_pixels applies
TOKENS_DEFAULT = (SIDE // 28) ** 2  # 64: the checkpoint's own max_pixels (28 * 28 * 64)
BUDGET = 8
QUESTION = "what is in the image?"


@pytest.fixture(scope="module", params=REQUEST_KWARGS)
def qwen_server(request, tiny_qwen):
    from server_utils import VllmServer

    settings = {"method": "script", "budget": BUDGET, "request_kwargs": request.param}
    extra = ["--mm-processor-kwargs", f'{{"max_pixels": {SERVER_WIDE_PIXELS}}}']
    srv = VllmServer(tiny_qwen, settings=settings, extra_args=extra)
    srv.start()
    srv.mode = request.param
    srv.openai = srv.client(timeout=120)
    srv.model = srv.openai.models.list().data[0].id
    srv.text_only = _chat(srv, with_image=False).usage.prompt_tokens
    yield srv
    srv.openai.close()
    srv.stop()


def _chat(srv, mm_processor_kwargs: dict | None = None, *, with_image: bool = True, seed=5):
    parts = [{"type": "image_url", "image_url": {"url": image_url(seed, SIDE)}}] * with_image
    return srv.openai.chat.completions.create(
        model=srv.model,
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}],
        max_tokens=4,
        temperature=0,
        extra_body=None
        if mm_processor_kwargs is None
        else {"mm_processor_kwargs": mm_processor_kwargs},
    )


def _visual_tokens(srv, mm_processor_kwargs: dict | None = None) -> int:
    # minus <|vision_start|> and <|vision_end|>, which the text-only prompt lacks
    return _chat(srv, mm_processor_kwargs).usage.prompt_tokens - srv.text_only - 2


@pytest.mark.e2e
def test_server_wide_processor_kwargs_apply(qwen_server):
    assert _visual_tokens(qwen_server, {"script": {"method": "none"}}) == TOKENS_SERVER_WIDE
    assert _visual_tokens(qwen_server) == BUDGET


@pytest.mark.e2e
def test_script_per_request_works(qwen_server):
    assert _visual_tokens(qwen_server, {"script": {"budget": 4}}) == 4
    assert _visual_tokens(qwen_server, {"script": {"method": "gsp", "budget": 12}}) == 12


# id -> (per-request kwargs, what a 400 names under "script-only", visual tokens under "all")
OTHER_KWARGS = {
    "max_pixels-up": ({"max_pixels": SIDE * SIDE}, "'max_pixels'", TOKENS_DEFAULT),
    "max_pixels-down": ({"max_pixels": 56 * 56}, "'max_pixels'", (56 // 28) ** 2),
    "images_kwargs": ({"images_kwargs": {"max_pixels": SIDE * SIDE}}, "'images_kwargs'", 64),
    "with-script": ({"max_pixels": SIDE * SIDE, "script": {"budget": 4}}, "'max_pixels'", 4),
}


@pytest.mark.e2e
@pytest.mark.parametrize(("kwargs", "named", "under_all"), OTHER_KWARGS.values(), ids=OTHER_KWARGS)
def test_other_processor_kwargs_per_request(qwen_server, kwargs, named, under_all):
    import openai

    unpruned = {"script": {"method": "none"}, **kwargs}
    if qwen_server.mode == "script-only":
        with pytest.raises(openai.BadRequestError) as info:
            _chat(qwen_server, unpruned)
        assert named in str(info.value.body), info.value.body
        assert "request_kwargs" in str(info.value.body)
    else:  # "all": vLLM's behaviour, the request's kwarg overrides the server's
        assert _visual_tokens(qwen_server, unpruned) == under_all
    # either way the server keeps serving, with the server-wide kwargs
    assert _visual_tokens(qwen_server, {"script": {"method": "none"}}) == TOKENS_SERVER_WIDE
    assert qwen_server.alive()
