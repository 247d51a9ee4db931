"""The generic 1-D adapter without an engine: the replacement rule, and each row's
processor against vLLM's in-tree processor (same prompt, fields and placeholders when
unconfigured; N -> min(budget, N) embedding tokens per image, text kept, when pruning)."""

from __future__ import annotations

import pytest
import torch

from vllm_script import plugin
from vllm_script.config import SettingsError
from vllm_script.models import generic
from vllm_script.models.generic import embed_runs, shrink_replacement

T, E = 5, 9  # a text token and an embedding token


def _mask(ids):
    return [t == E for t in ids]


@pytest.mark.parametrize(
    ("full", "runs"),
    [
        ([E, E, E], [(0, 3)]),
        ([T, E, E, T], [(1, 3)]),
        ([T, T], []),
        ([E, T, E, E, T, E], [(0, 1), (2, 4), (5, 6)]),
    ],
    ids=["all-embed", "text-around", "no-embed", "three-runs"],
)
def test_embed_runs(full, runs):
    assert embed_runs(_mask(full)) == runs


@pytest.mark.parametrize(
    ("full", "keep", "expected"),
    [
        ([E] * 6, 1, [E]),
        ([E] * 6, 6, [E] * 6),
        ([T, 7, E, E, E, E, 8, T], 2, [T, 7, E, E, 8, T]),
        ([E, E, E, 8], 1, [E, 8]),
        ([7, E, E, E], 3, [7, E, E, E]),
    ],
    ids=["k1", "k-equals-n", "text-both-sides", "text-after", "text-before-k-n"],
)
def test_shrink_keeps_text_around_one_run(full, keep, expected):
    ids, mask = shrink_replacement(full, _mask(full), keep, where="x")
    assert ids == expected
    assert list(mask) == _mask(expected)


def test_several_runs_are_refused_naming_them():
    full = [7, E, E, T, E, E, E, T, E, 8]
    with pytest.raises(SettingsError, match=r"6 visual tokens come in 3 runs .*\[2, 3, 1\]"):
        shrink_replacement(full, _mask(full), 2, where="Gemma3 image 0")


def test_embedding_tokens_with_several_ids_are_an_error():
    full = [7, E, 6, 8]
    with pytest.raises(RuntimeError, match=r"several ids \[6, 9\]"):
        shrink_replacement(full, [False, True, True, False], 1, where="x")


def test_plugin_registers_every_row_lazily():
    for arch, target in generic.registrations().items():
        assert plugin.ARCHITECTURES[arch] == target
        module, name = target.split(":")
        assert module == "vllm_script.models.generic" and name == "Script" + arch


# ---- each row's processor, against the in-tree one ----

ROWS = {
    "gemma3": ("Gemma3ForConditionalGeneration", "<start_of_image>", "<image_soft_token>"),
    "internvl": ("InternVLForConditionalGeneration", "<IMG_CONTEXT>", "<IMG_CONTEXT>"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "<image>", "<image>"),
}
SIZES = [(448, 224), (224, 224)]


@pytest.fixture(scope="module", params=sorted(ROWS))
def arch(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


def _model_config(path, **kwargs):
    from vllm.config import ModelConfig

    plugin.register()
    return ModelConfig(model=str(path), **kwargs)


def _processors(path, **kwargs):
    """(ours, vLLM's in-tree) processors for the checkpoint at `path`."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import InputProcessingContext
    from vllm.tokenizers import cached_tokenizer_from_config

    config = _model_config(path, **kwargs)
    ours = MULTIMODAL_REGISTRY.create_processor(config)
    row = generic.ARCHITECTURES[config.architectures[0]]
    in_tree = generic._load(row.model)._processor_factory
    ctx = InputProcessingContext(config, cached_tokenizer_from_config(config))
    return ours, in_tree.build_processor(ctx)


def _apply(processor, tag: str, kwargs: dict | None = None, sizes=SIZES):
    from vllm_script.testing import random_image

    images = [random_image(i + 1, w, h) for i, (w, h) in enumerate(sizes)]
    prompt = "what is in " + " and ".join([tag] * len(images)) + " ? answer"
    items = processor.info.parse_mm_data({"image": images})
    return processor(prompt, items, hf_processor_mm_kwargs=kwargs or {})


def _placeholders(out):
    return [
        (p.offset, p.length, None if p.is_embed is None else p.is_embed.tolist())
        for p in out["mm_placeholders"]["image"]
    ]


def test_unconfigured_processor_equals_in_tree(arch):
    name, path = arch
    ours, in_tree = _processors(path)
    assert type(ours).__name__.startswith("Script") and type(in_tree) in type(ours).__mro__
    tag = ROWS[name][1]
    mine, theirs = _apply(ours, tag), _apply(in_tree, tag)
    assert mine["prompt_token_ids"] == theirs["prompt_token_ids"]
    assert _placeholders(mine) == _placeholders(theirs)
    assert mine["mm_hashes"] == theirs["mm_hashes"]
    a, b = mine["mm_kwargs"].get_data(), theirs["mm_kwargs"].get_data()
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def _runs(ids, token):
    return [end - start for start, end in embed_runs([t == token for t in ids])]


@pytest.mark.parametrize("budget", [1, 40, 10_000], ids=["k1", "k40", "k-above-n"])
def test_server_budget_prunes_each_image_and_keeps_the_text(arch, budget, monkeypatch):
    name, path = arch
    recorded = []
    monkeypatch.setattr(
        "vllm_script.models.common.record_image", lambda *args: recorded.append(args)
    )
    ours, in_tree = _processors(path, hf_overrides={"script": {"budget": budget}})
    tag, embed = ROWS[name][1], ROWS[name][2]
    token = ours.info.get_tokenizer().convert_tokens_to_ids(embed)
    pruned, full = _apply(ours, tag), _apply(in_tree, tag)
    n = _runs(full["prompt_token_ids"], token)
    assert len(n) == len(SIZES) and all(x > 40 for x in n)
    assert _runs(pruned["prompt_token_ids"], token) == [min(budget, x) for x in n]
    rest = [t for t in pruned["prompt_token_ids"] if t != token]
    assert rest == [t for t in full["prompt_token_ids"] if t != token]
    assert [sum(p[2]) if p[2] else p[1] for p in _placeholders(pruned)] == [
        min(budget, x) for x in n
    ]
    assert recorded == [("script", x, min(budget, x)) for x in n]  # the metrics
    fields = pruned["mm_kwargs"].get_data()
    assert len(fields["script_settings"]) == len(SIZES)


def test_vision_space_methods_refused_naming_the_architecture(arch):
    name, path = arch
    ours, _ = _processors(path)
    short = generic.ARCHITECTURES[ROWS[name][0]].short_name
    for bad, key in (({"method": "trim"}, "method"), ({"method": "prumerge+"}, "method")):
        with pytest.raises(SettingsError, match=rf"'script.{key}'.*{short} supports"):
            _apply(ours, ROWS[name][1], {"script": bad})


def test_gemma3_pan_and_scan_crops_are_refused_not_misplaced(tiny_gemma3):
    kwargs = {"mm_processor_kwargs": {"do_pan_and_scan": True}}
    ours, in_tree = _processors(tiny_gemma3, **kwargs)
    wide = [(1200, 400)]  # the original + three 400-px crops: four runs of 64 tokens
    full = _apply(in_tree, "<start_of_image>", sizes=wide)
    token = ours.info.get_tokenizer().convert_tokens_to_ids("<image_soft_token>")
    assert _runs(full["prompt_token_ids"], token) == [64, 64, 64, 64]
    with pytest.raises(SettingsError, match=r"256 visual tokens come in 4 runs"):
        _apply(ours, "<start_of_image>", {"script": {"budget": 16}}, sizes=wide)
    unpruned = _apply(ours, "<start_of_image>", {"script": {"budget": 256}}, sizes=wide)
    assert unpruned["prompt_token_ids"] == full["prompt_token_ids"]
