"""Visual tokens per image (N) for each supported architecture at its released geometry.

N is what a budget is compared with (K = min(budget, N)). It depends only on the
processor and the vision geometry, not on the model's size, so each architecture is
measured on a random-weight checkpoint written by `vllm_script.testing` with the released
models' image geometry (tower resolution, patch size, tokens per image or tile, tiling /
any-resolution grid, pixel limits) and a tiny decoder. vLLM's own in-tree processor (the
plugin not loaded) processes one image of each size; N is the number of its embedding
tokens (`is_embed`), "prompt" the tokens its placeholder takes in the prompt (N plus
the text around it).

    python benchmarks/arch_tokens.py            # writes results/arch_tokens.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path

SIZES = [(640, 480), (1024, 768), (1920, 1080), (768, 1024)]
OUT = Path(__file__).parent / "results" / "arch_tokens.csv"

# architecture -> (writer, keyword arguments for the released geometry, image tag, geometry)
GEOMETRIES = {
    "LlavaForConditionalGeneration": (
        "write_tiny_llava",
        {},
        "<image>",
        "LLaVA-1.5: CLIP 336 px, 14-px patches",
    ),
    "LlavaNextForConditionalGeneration": (
        "write_tiny_llava_next",
        {
            "image_size": 336,
            "grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        },
        "<image>",
        "LLaVA-NeXT 1.6: 336-px crops, 5 pinpoints up to 672x672",
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        "write_tiny_qwen2_5_vl",
        {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384},
        "<|vision_start|><|image_pad|><|vision_end|>",
        "Qwen2.5-VL: 28-px units, 3136 to 12845056 pixels",
    ),
    "Gemma3ForConditionalGeneration": (
        "write_tiny_gemma3",
        {"image_size": 896, "tokens_per_image": 256},
        "<start_of_image>",
        "Gemma 3: SigLIP 896 px pooled to 256, no pan-and-scan",
    ),
    "InternVLForConditionalGeneration": (
        "write_tiny_internvl",
        {"tile_size": 448, "max_tiles": 12},
        "<IMG_CONTEXT>",
        "InternVL3: 448-px tiles of 256, 1-12 tiles + thumbnail",
    ),
    "LlavaOnevisionForConditionalGeneration": (
        "write_tiny_llava_onevision",
        {
            "image_size": 384,
            "grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
        },
        "<image>",
        "LLaVA-OneVision: SigLIP 384-px crops, pinpoints up to 6x6, anyres_max_9",
    ),
}


def measure(arch: str, workdir: Path) -> list[dict]:
    from vllm.config import ModelConfig
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.multimodal.processing import InputProcessingContext
    from vllm.tokenizers import cached_tokenizer_from_config

    from vllm_script import testing
    from vllm_script.testing import random_image

    writer, kwargs, tag, geometry = GEOMETRIES[arch]
    path = getattr(testing, writer)(workdir / arch, **kwargs)
    config = ModelConfig(model=str(path))
    model_cls, _ = ModelRegistry.resolve_model_cls(config.architectures, config)
    assert model_cls.__module__.startswith("vllm."), model_cls  # vLLM's own, not the plugin's
    ctx = InputProcessingContext(config, cached_tokenizer_from_config(config))
    processor = model_cls._processor_factory.build_processor(ctx)
    rows = []
    for width, height in SIZES:
        items = processor.info.parse_mm_data({"image": [random_image(0, width, height)]})
        out = processor("describe " + tag, items)
        (placeholder,) = out["mm_placeholders"]["image"]
        n = placeholder.length if placeholder.is_embed is None else int(placeholder.is_embed.sum())
        rows.append(
            {
                "architecture": arch,
                "image": f"{width}x{height}",
                "N": n,
                "prompt": placeholder.length,
                "geometry": geometry,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--arch", nargs="*", default=list(GEOMETRIES))
    args = parser.parse_args()
    os.environ["VLLM_PLUGINS"] = "none-at-all"  # vLLM's own processors
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            rows += measure(arch, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
