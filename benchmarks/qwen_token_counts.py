"""Visual tokens per item (N) for Qwen2.5-VL and Qwen3-VL at typical sizes, from the HF
image / video processors (no weights, no vLLM): the counts the README's architecture
table quotes. Writes benchmarks/results/qwen_token_counts.csv.

    python benchmarks/qwen_token_counts.py

Processor settings: Qwen2.5-VL 14-px patches merged 2x2 (28 px per token), Qwen3-VL
16-px patches merged 2x2 (32 px per token); images within 65,536 to 16,777,216 pixels
(Qwen2.5-VL: 3,136 to 12,845,056), videos with the HF video processors' defaults, frames
given as decoded (no resampling).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "qwen_token_counts.csv"
IMAGES = [(448, 448), (1024, 768), (1280, 720), (1920, 1080)]
VIDEOS = [(640, 360, 8), (640, 360, 32), (1280, 720, 32)]  # width, height, frames


def processors():
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3VLVideoProcessor

    return {
        "Qwen2.5-VL": (
            Qwen2VLImageProcessor(
                patch_size=14, merge_size=2, size={"shortest_edge": 3136, "longest_edge": 12845056}
            ),
            Qwen2VLVideoProcessor(patch_size=14, merge_size=2),
        ),
        "Qwen3-VL": (
            Qwen2VLImageProcessor(
                patch_size=16, merge_size=2, size={"shortest_edge": 65536, "longest_edge": 16777216}
            ),
            Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
        ),
    }


def main() -> None:
    rows = []
    for arch, (image_proc, video_proc) in processors().items():
        for w, h in IMAGES:
            image = np.zeros((h, w, 3), dtype=np.uint8)
            t, gh, gw = image_proc(images=[image], return_tensors="pt")["image_grid_thw"][
                0
            ].tolist()
            rows.append([arch, "image", f"{w}x{h}", 1, t, gh // 2, gw // 2, t * gh * gw // 4])
        for w, h, frames in VIDEOS:
            video = np.zeros((frames, h, w, 3), dtype=np.uint8)
            out = video_proc(videos=[video], do_sample_frames=False, return_tensors="pt")
            t, gh, gw = out["video_grid_thw"][0].tolist()
            rows.append([arch, "video", f"{w}x{h}", frames, t, gh // 2, gw // 2, t * gh * gw // 4])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arch", "modality", "size", "frames", "T", "H", "W", "N"])
        writer.writerows(rows)
    for row in rows:
        print(*row, sep="\t")


if __name__ == "__main__":
    main()
