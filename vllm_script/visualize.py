"""Draw an image with the patches a pruning method kept, as vLLM really kept them.

    python -m vllm_script.visualize --question "what is in the image?" \
        --method script --budget 64 [--image photo.jpg] [--model DIR] --out kept.png

Starts a vLLM engine on `--model` (default: the built-in tiny LLaVA-1.5-shaped model)
with the given settings, sends one request, reads back the indices the worker kept, and
writes a PNG: kept patches at full brightness with an outline, the others dimmed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

DIM = 0.25  # brightness of pruned patches
OUTLINE = (255, 64, 32)


def center_crop_square(image: Image.Image, size: int) -> Image.Image:
    """What CLIP's processor shows the vision tower: shortest edge to `size`, centre crop."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    resized = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
        Image.BICUBIC,
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def draw_kept(
    image: Image.Image, keep: Sequence[int], grid: int, *, outline: bool = True
) -> Image.Image:
    """image [S x S], kept patch indices (row-major on a grid x grid lattice) -> RGB image.

    Pruned patches are dimmed to `DIM` brightness; kept ones are left as they are and,
    with `outline`, framed.
    """
    image = image.convert("RGB")
    size = image.width
    cell = size / grid
    kept = set(int(i) for i in keep)
    if any(i < 0 or i >= grid * grid for i in kept):
        raise ValueError(f"keep indices must be in [0, {grid * grid}), got {sorted(kept)[:5]}...")
    dimmed = image.point(lambda v: int(v * DIM))
    out = dimmed.copy()
    for i in kept:
        r, c = divmod(i, grid)
        box = (round(c * cell), round(r * cell), round((c + 1) * cell), round((r + 1) * cell))
        out.paste(image.crop(box), box[:2])
    if outline:
        draw = ImageDraw.Draw(out)
        for i in kept:
            r, c = divmod(i, grid)
            x0, y0 = round(c * cell), round(r * cell)
            x1, y1 = round((c + 1) * cell) - 1, round((r + 1) * cell) - 1
            draw.rectangle((x0, y0, x1, y1), outline=OUTLINE)
    return out


def kept_indices_from_vllm(
    model: str, image: Image.Image, question: str, settings: dict
) -> list[int]:
    """Run one request through vLLM with `settings` and return the kept patch indices."""
    os.environ["VLLM_SCRIPT_RECORD_SELECTIONS"] = "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from vllm_script.pruning import recent_selections

    llm = LLM(
        model=model, hf_overrides={"script": settings}, enforce_eager=True, max_model_len=4096
    )
    llm.generate(
        {"prompt": f"USER: <image>\n{question} ASSISTANT:", "multi_modal_data": {"image": image}},
        SamplingParams(max_tokens=1, temperature=0),
        use_tqdm=False,
    )
    recorded = llm.collective_rpc(recent_selections)[0]
    if not recorded:
        raise RuntimeError(
            f"no selection was made: budget {settings.get('budget')} keeps every token?"
        )
    return recorded[-1]["keep"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="LLaVA-1.5 checkpoint dir (default: tiny)")
    parser.add_argument("--image", default=None, help="image file (default: a synthetic one)")
    parser.add_argument("--question", default="what is in the image?")
    parser.add_argument("--method", default="script")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--out", default="kept.png")
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from vllm_script.testing import random_image, write_tiny_llava

    model = args.model or str(
        write_tiny_llava(Path(tempfile.gettempdir()) / "vllm-script-tiny-llava")
    )
    vision = AutoConfig.from_pretrained(model).vision_config
    grid = vision.image_size // vision.patch_size
    image = Image.open(args.image) if args.image else random_image(0)
    settings = {"method": args.method, "budget": args.budget}
    keep = kept_indices_from_vllm(model, image, args.question, settings)
    if len(keep) > grid * grid:
        raise RuntimeError(f"{len(keep)} kept indices do not fit a {grid}x{grid} grid")
    out = draw_kept(center_crop_square(image, vision.image_size), keep, grid)
    out.save(args.out)
    print(f"[visualize] {len(keep)} of {grid * grid} patches kept ({settings}) -> {args.out}")


if __name__ == "__main__":
    main()
