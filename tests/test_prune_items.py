"""`vllm_script.pruning.prune_items` without an engine: what the model side gets.

Engine-free (runs under `-m "not e2e"`): the tiny checkpoint's vision width and a tiny
random CLIP checkpoint, random features, a random embedding table for the question.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from engine_utils import vision_width

from vllm_script.clip_text import load_clip_relevance
from vllm_script.config import METHODS, ScriptSettings
from vllm_script.methods import (
    apply_selection,
    cls_attention_from_qk,
    prumerge_plus_select,
)
from vllm_script.pruning import ImageInput, PruneContext, prune_items, square_grid

N = 576  # 24 x 24 tokens, as the tiny checkpoint's images
DIM = 32  # LLM width of the stand-in projector
ACTIVE = [m for m in METHODS if m != "none"]
QUERY_METHODS = [m for m in ACTIVE if METHODS[m]]  # script, qcsp, trim
AGNOSTIC_METHODS = [m for m in ACTIVE if not METHODS[m]]  # gsp, prumerge+, divprune, uniform
QUESTIONS = [
    (torch.tensor([3, 4, 5]), "which color is the car"),
    (torch.tensor([17, 30, 41, 8]), "how many people are there"),
]


@pytest.fixture(scope="module")
def ctx(tiny_llava, clip_dir):
    width = vision_width(tiny_llava)
    torch.manual_seed(0)
    return PruneContext(
        torch.nn.Embedding(50, DIM),
        torch.nn.Linear(width, DIM),
        load_clip_relevance(clip_dir, width),
    )


def _images(width: int, count: int = 2, question: int = 0, seed: int = 0) -> list[ImageInput]:
    gen = torch.Generator().manual_seed(seed)
    ids, text = QUESTIONS[question]
    return [
        ImageInput(
            features=torch.randn(N, width, generator=gen),
            cls_query=torch.randn(width, generator=gen),
            layer_keys=torch.randn(N + 1, width, generator=gen),
            grid=square_grid(N),
            query_ids=ids,
            query_text=text,
        )
        for _ in range(count)
    ]


def test_selection_api_imports_without_vllm():
    code = (
        "import sys\n"
        "from vllm_script.methods import (Selection, apply_selection, clip_relevance,\n"
        "    cls_attention_from_qk, divprune_select, gsp_select, prumerge_plus_select,\n"
        "    qcsp_select, script_select, trim_select, uniform_select)\n"
        "import vllm_script.pruning\n"
        "assert 'vllm' not in sys.modules, 'the selection API imported vLLM'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("reference", ["paper", "code"])
@pytest.mark.parametrize("relevance", ["llm", "clip"])
def test_prune_items_without_an_engine(tiny_llava, ctx, relevance, reference):
    """Every method, both relevance sources: exactly K rows; TRIM at K=1 = proj(mean)."""
    images = _images(vision_width(tiny_llava))
    with torch.no_grad():
        for method in ACTIVE:
            for k in (1, 2, 575, 576):
                cfg = ScriptSettings(
                    method=method, budget=k, relevance=relevance, reference=reference
                )
                out = prune_items(images, [cfg, cfg], ctx)
                assert [tuple(o.shape) for o in out] == [(min(k, N), DIM)] * 2, (method, k)
                assert all(torch.isfinite(o).all() for o in out)
        cfg = ScriptSettings(method="trim", budget=1, relevance=relevance, reference=reference)
        out = prune_items(images, [cfg, cfg], ctx)
        for image, rows in zip(images, out, strict=True):
            expected = ctx.project(image.features.mean(dim=0, keepdim=True))
            torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)


def _kept(ctx, images, cfg) -> tuple[list[list[int]], list[torch.Tensor]]:
    kept: list = []
    with torch.no_grad():
        rows = prune_items(images, [cfg] * len(images), ctx, kept_indices=kept)
    return [k.tolist() for k in kept], rows


@pytest.mark.parametrize("reference", ["paper", "code"])
@pytest.mark.parametrize("relevance", ["llm", "clip"])
@pytest.mark.parametrize("method", ACTIVE)
def test_two_questions_change_the_selection_only_where_the_method_reads_them(
    tiny_llava, ctx, method, relevance, reference
):
    """One image, two questions: query methods keep other tokens; the others the same."""
    width = vision_width(tiny_llava)
    cfg = ScriptSettings(method=method, budget=64, relevance=relevance, reference=reference)
    first, rows_first = _kept(ctx, _images(width, 1, question=0), cfg)
    second, rows_second = _kept(ctx, _images(width, 1, question=1), cfg)
    if method in QUERY_METHODS:
        assert set(first[0]) != set(second[0]), f"{method} ignored the question"
    else:
        assert first == second, f"{method} is query-agnostic but changed with the question"
        assert torch.equal(rows_first[0], rows_second[0])


def test_prumerge_code_rows_come_in_the_codes_order(tiny_llava, ctx):
    """reference "code": the LLM gets PruMerge+'s rows in the code's (non-spatial) order,
    and kept_indices lists them in that order."""
    width = vision_width(tiny_llava)
    images = _images(width, 1)
    cfg = ScriptSettings(method="prumerge+", budget=64, reference="code")
    kept, rows = _kept(ctx, images, cfg)
    assert kept[0] != sorted(kept[0]), "the code's order is not ascending here"
    image = images[0]
    attn = cls_attention_from_qk(image.cls_query[None], image.layer_keys[None], num_heads=1)
    sel = prumerge_plus_select(
        image.features[None], image.layer_keys[None, 1:], attn, 64, image.grid, reference="code"
    )
    assert sel.keep[0].tolist() == kept[0]
    with torch.no_grad():
        expected = ctx.project(apply_selection(image.features[None], sel))[0]
    torch.testing.assert_close(rows[0], expected)
