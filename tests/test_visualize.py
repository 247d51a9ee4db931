"""The kept-patch picture: unit drawing and the CLI through vLLM."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vllm_script.visualize import DIM, center_crop_square, draw_kept


def bright_image(size: int = 336) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(128, 256, size=(size, size, 3), dtype=np.uint8))


def highlighted_patches(original: Image.Image, drawn: Image.Image, grid: int) -> set[int]:
    """Patches whose centre pixel kept its original value (pruned ones are dimmed)."""
    a, b = np.asarray(original.convert("RGB")), np.asarray(drawn.convert("RGB"))
    cell = original.width / grid
    out = set()
    for i in range(grid * grid):
        r, c = divmod(i, grid)
        y, x = int((r + 0.5) * cell), int((c + 0.5) * cell)
        if (a[y, x] == b[y, x]).all():
            out.add(i)
        else:
            assert np.allclose(b[y, x], (a[y, x] * DIM).astype(int), atol=1)
    return out


@pytest.mark.parametrize(
    "keep",
    [[0], [5, 17, 300, 575], list(range(0, 576, 9)), list(range(576))],
    ids=["k=1", "k=4", "k=64", "k=N"],
)
def test_draw_highlights_exactly_the_kept_patches(keep):
    image = bright_image()
    drawn = draw_kept(image, keep, 24)
    assert drawn.size == image.size
    assert highlighted_patches(image, drawn, 24) == set(keep)


def test_draw_rejects_out_of_grid_indices():
    with pytest.raises(ValueError, match=r"keep indices must be in \[0, 576\)"):
        draw_kept(bright_image(), [576], 24)


def test_center_crop_square_matches_clip_geometry():
    out = center_crop_square(Image.new("RGB", (640, 480)), 336)
    assert out.size == (336, 336)


@pytest.mark.e2e
def test_cli_writes_png_with_k_patches_highlighted(tmp_path, tiny_llava):
    out = tmp_path / "kept.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_script.visualize",
            "--model",
            str(tiny_llava),
            "--budget",
            "40",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from vllm_script.testing import random_image

    drawn = Image.open(out)
    drawn.load()
    original = center_crop_square(random_image(0), 336)
    assert len(highlighted_patches(original, drawn, 24)) == 40
