"""CLIP relevance loader: errors name the path / widths; a tiny offline checkpoint round-trips."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vllm_script.clip_text import (
    ClipCheckpointError,
    ClipRelevance,
    load_clip_relevance,
    write_tiny_clip_checkpoint,
)

VISION_WIDTH = 48


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny_clip"), VISION_WIDTH)


@pytest.fixture(scope="module")
def clip(ckpt: str) -> ClipRelevance:
    return load_clip_relevance(ckpt, VISION_WIDTH, "cpu", torch.float32)


@pytest.fixture(scope="module")
def hf_model(ckpt: str):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(ckpt).eval()


def test_missing_path_is_named(tmp_path) -> None:
    missing = str(tmp_path / "no_such_clip")
    with pytest.raises(ClipCheckpointError, match="no_such_clip.*does not exist"):
        load_clip_relevance(missing, VISION_WIDTH)


def test_directory_without_config_is_named(tmp_path) -> None:
    with pytest.raises(ClipCheckpointError, match=rf"{tmp_path.name}.*no config.json"):
        load_clip_relevance(tmp_path, VISION_WIDTH)


def test_non_clip_checkpoint_is_named(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ClipCheckpointError, match=rf"{tmp_path.name}.*'llama'.*'clip'"):
        load_clip_relevance(tmp_path, VISION_WIDTH)


def test_width_mismatch_names_both_widths(ckpt: str) -> None:
    with pytest.raises(ClipCheckpointError, match=r"hidden size 48.*width 1024"):
        load_clip_relevance(ckpt, 1024)


def test_bad_vision_width_is_named(ckpt: str) -> None:
    with pytest.raises(ValueError, match="vision_width=0"):
        load_clip_relevance(ckpt, 0)


def test_tokenizer_loads_with_auto_tokenizer(ckpt: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("a cat")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + 4  # byte-level, no merges: "a</w>", "c", "a", "t</w>"


def test_round_trip_shapes(clip: ClipRelevance) -> None:
    text = clip.text_embeds(["what is in the image?", "", "count the cats"])
    assert text.shape == (3, 16) and text.dtype == torch.float32
    image = clip.image_embeds(torch.randn(2, 5, VISION_WIDTH))
    assert image.shape == (2, 5, 16)
    assert clip.vision_width == VISION_WIDTH and clip.embed_dim == 16


def test_text_embeds_match_transformers(clip: ClipRelevance, hf_model, ckpt: str) -> None:
    from transformers import AutoTokenizer

    questions = ["what is in the image?", "count the cats"]
    batch = AutoTokenizer.from_pretrained(ckpt)(questions, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf_model.get_text_features(**batch)
    ref = getattr(ref, "pooler_output", ref)  # a tensor or an output object by version
    torch.testing.assert_close(clip.text_embeds(questions), F.normalize(ref, dim=-1))


def test_long_question_is_averaged_over_77_token_segments(clip: ClipRelevance) -> None:
    words = [chr(ord("a") + i % 26) for i in range(160)]  # one token per 1-letter word
    long = " ".join(words)  # 160 tokens -> segments of 75, 75, 10
    (segs,) = clip.text_segment_embeds([long])
    assert segs.shape == (3, 16)
    parts = [clip.text_segment_embeds([" ".join(words[i : i + 75])])[0][0] for i in (0, 75, 150)]
    torch.testing.assert_close(segs, torch.stack(parts))
    expected = F.normalize(segs, dim=-1).mean(dim=0)
    torch.testing.assert_close(clip.text_embeds([long])[0], expected)
    assert not torch.allclose(segs[0], segs[2])


def test_image_embeds_are_projected_post_layernorm(clip: ClipRelevance, hf_model) -> None:
    x = torch.randn(2, 5, VISION_WIDTH)
    with torch.no_grad():
        ref = hf_model.visual_projection(hf_model.vision_model.post_layernorm(x))
        own = hf_model.visual_projection(x)
    torch.testing.assert_close(clip.image_embeds(x), ref)
    # the caller's own post-layernorm replaces the checkpoint's
    torch.testing.assert_close(clip.image_embeds(x, nn.Identity()), own)


def test_image_embeds_width_error(clip: ClipRelevance) -> None:
    with pytest.raises(ValueError, match=r"width 32.*vision width 48"):
        clip.image_embeds(torch.randn(1, 5, 32))


def test_writer_is_seeded(tmp_path) -> None:
    from safetensors.torch import load_file

    a = write_tiny_clip_checkpoint(tmp_path / "a", 8, seed=1)
    b = write_tiny_clip_checkpoint(tmp_path / "b", 8, seed=1)
    wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    key = "visual_projection.weight"
    assert wa[key].shape == (16, 8) and torch.equal(wa[key], wb[key])
