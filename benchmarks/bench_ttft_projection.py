"""A 7B-shaped TTFT projection: vision + prefill with and without pruning, selection in place.

No vLLM (the GPU check machine has none): random bf16 weights of LLaVA-1.5-7B's shapes under
transformers, CLIP ViT-L/14-336 (+ LLaVA's 2-layer projector) and a Vicuna-7B-shaped Llama
decoder (6.74B parameters), attention "sdpa". Per geometry and batch size, timed (median of
--repeats after --warmup untimed runs, CUDA-synchronised):

- vision: the tower on the batch's crops (1 per image at LLaVA-1.5, 5 at LLaVA-NeXT's
  2880 tokens: base + 2x2 tiles, no newline tokens) + the projector;
- prefill of the text (--text-tokens) + N visual tokens, and of the text + K kept tokens
  (one forward, last-token logits, as a serving engine computes them);
- each method's selection through the `vllm_script.methods` calls the plugin makes, with
  the default settings (relevance from the question's input embeddings, selection,
  gather; `uniform` without the image grid), on the projector's output.

TTFT off = vision + prefill(N); ideal = vision + prefill(K) (selection free);
TTFT on = ideal + selection. Written per (geometry, batch, method): speed-up = off / on,
ideal speed-up = off / ideal, % of ideal = ideal / on, selection % of TTFT = select / on.
A serving engine's prefill is faster than transformers' eager one, so there the
selection's share of TTFT is larger, not smaller.

    python benchmarks/bench_ttft_projection.py                # GPU, 7B shapes (~40 s on an H200)
    python benchmarks/bench_ttft_projection.py --small        # CPU dry run, tiny shapes
"""

from __future__ import annotations

import argparse
import csv
import functools
import statistics
import time
from pathlib import Path

import torch

from vllm_script.methods import (
    apply_selection,
    divprune_select,
    gsp_select,
    qcsp_select,
    script_select,
    uniform_select,
)
from vllm_script.relevance import llm_relevance

# LLaVA-1.5-7B: CLIP ViT-L/14-336 + 2-layer MLP projector + Vicuna-7B
FULL = {
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=336, patch_size=14),
    "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                 max_position_embeddings=4096),
    "geometries": {"llava15": (1, 64), "llavanext": (5, 320)},  # crops per image, K
}  # fmt: skip
SMALL = {
    "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, image_size=56, patch_size=14),
    "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, vocab_size=1000,
                 max_position_embeddings=512),
    "geometries": {"llava15": (1, 4), "llavanext": (5, 20)},
}  # fmt: skip
METHODS = ("script", "qcsp", "gsp", "divprune", "uniform")
FIELDS = [
    "device", "geometry", "n", "k", "batch", "method", "vision_ms", "prefill_off_ms",
    "prefill_on_ms", "select_ms", "ttft_off_ms", "ttft_ideal_ms", "ttft_on_ms", "speedup",
    "ideal_speedup", "pct_of_ideal", "select_pct_ttft", "repeats", "dtype",
]  # fmt: skip


class Models:
    def __init__(self, shapes: dict, device: torch.device, dtype: torch.dtype):
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            self.vision = CLIPVisionModel(CLIPVisionConfig(**shapes["vision"])).to(dtype).eval()
            width, hidden = shapes["vision"]["hidden_size"], shapes["text"]["hidden_size"]
            self.projector = torch.nn.Sequential(
                torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
            ).to(dtype)
            cfg = LlamaConfig(**shapes["text"], attn_implementation="sdpa")
            self.llm = LlamaForCausalLM(cfg).to(dtype).eval()
        self.image_size = shapes["vision"]["image_size"]
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, crops: int) -> torch.Tensor:
        """[B * crops, 3, S, S] -> [B, crops * patches, D]: LLaVA's penultimate layer,
        CLS dropped, projected."""
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        feats = out.hidden_states[-2][:, 1:]
        tokens = self.projector(feats)
        return tokens.reshape(pixels.shape[0] // crops, -1, tokens.shape[-1])

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits


@torch.inference_mode()
def select(method: str, tokens: torch.Tensor, query: list[torch.Tensor], k: int) -> torch.Tensor:
    """The plugin's selection for one batch: fp32 once on CPU, relevance, method, gather."""
    sel_in = tokens.float() if tokens.device.type == "cpu" else tokens
    if method == "script":
        selection = script_select(sel_in, llm_relevance(sel_in, query), k)
    elif method == "qcsp":
        selection = qcsp_select(sel_in, llm_relevance(sel_in, query), k)
    elif method == "gsp":
        selection = gsp_select(sel_in, k)
    elif method == "divprune":
        selection = divprune_select(sel_in, k)
    else:
        selection = uniform_select(tokens.shape[1], k, batch=tokens.shape[0])
        selection.keep = selection.keep.to(tokens.device)
    return apply_selection(tokens, selection)


def timed(fn, device: torch.device, repeats: int, warmup: int = 3) -> tuple[float, object]:
    """Median seconds over `repeats` runs after `warmup` untimed ones (a GPU's clocks ramp
    up and cuBLAS picks its kernels per shape on first use); and the last result."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(max(1, warmup)):
        out = fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SMALL if args.small else FULL
    models = Models(shapes, device, dtype)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gen = torch.Generator().manual_seed(1)
    text_ids = torch.randint(5, shapes["text"]["vocab_size"], (args.text_tokens,), generator=gen)
    rows = []
    for geo in args.geometries:
        crops, k = shapes["geometries"][geo]
        for bsz in args.batches:
            size = models.image_size
            pixels = torch.randn(bsz * crops, 3, size, size, generator=gen).to(device, dtype)
            encode = functools.partial(models.encode, pixels, crops)
            t_vision, tokens = timed(encode, device, args.repeats, args.warmup)
            n = tokens.shape[1]
            with torch.inference_mode():
                text = models.llm.get_input_embeddings()(text_ids.to(device))
            query = [text] * bsz
            full = torch.cat([text.expand(bsz, -1, -1), tokens], dim=1)
            pruned = torch.cat([text.expand(bsz, -1, -1), tokens[:, :k]], dim=1)
            t_off, _ = timed(
                functools.partial(models.prefill, full), device, args.repeats, args.warmup
            )
            t_on, _ = timed(
                functools.partial(models.prefill, pruned), device, args.repeats, args.warmup
            )
            for method in args.methods:
                call = functools.partial(select, method, tokens, query, k)
                t_sel, out = timed(call, device, args.repeats, args.warmup)
                assert out.shape == (bsz, k, tokens.shape[-1]), out.shape
                off, ideal = t_vision + t_off, t_vision + t_on
                on = ideal + t_sel
                rows.append(
                    {
                        "device": dev_name, "geometry": geo, "n": n, "k": k, "batch": bsz,
                        "method": method, "vision_ms": round(t_vision * 1e3, 3),
                        "prefill_off_ms": round(t_off * 1e3, 3),
                        "prefill_on_ms": round(t_on * 1e3, 3),
                        "select_ms": round(t_sel * 1e3, 3), "ttft_off_ms": round(off * 1e3, 3),
                        "ttft_ideal_ms": round(ideal * 1e3, 3), "ttft_on_ms": round(on * 1e3, 3),
                        "speedup": round(off / on, 3), "ideal_speedup": round(off / ideal, 3),
                        "pct_of_ideal": round(100 * ideal / on, 1),
                        "select_pct_ttft": round(100 * t_sel / on, 2), "repeats": args.repeats,
                        "dtype": str(dtype).removeprefix("torch."),
                    }
                )  # fmt: skip
                r = rows[-1]
                print(
                    f"{geo:9s} B={bsz:<3} {method:9s} N={n} K={k}  "
                    f"TTFT off {r['ttft_off_ms']:9.2f} ms  on {r['ttft_on_ms']:9.2f} ms  "
                    f"select {r['select_ms']:8.3f} ms "
                    f"({r['select_pct_ttft']:5.2f}% of TTFT)  speed-up {r['speedup']:.2f}x of "
                    f"{r['ideal_speedup']:.2f}x ({r['pct_of_ideal']:.1f}% of ideal)",
                    flush=True,
                )
    return rows


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU dry run)")
    ap.add_argument("--geometries", nargs="+", default=["llava15", "llavanext"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--text-tokens", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before each timing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = run(args)
    name = rows[0]["device"].replace(" ", "-") if rows else "none"
    out = args.out or Path(__file__).parent / "results" / f"ttft_projection_{name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    return out


if __name__ == "__main__":
    main()
