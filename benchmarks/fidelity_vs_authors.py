"""Side by side with the authors' released selection code, on the same synthetic inputs.

The authors' code is NOT part of this repository. Clone it yourself and point this script
at the clones; it reads the selection functions out of their files (by name, with `ast`),
runs them on synthetic inputs with stand-ins for the vision tower / projector, and compares
them with `vllm_script.methods` under `reference="paper"` and `reference="code"`:

    git clone https://github.com/Theia-4869/CDPruner
    git clone https://github.com/01yzzyu/script.github.io          # Script (TMLR 2025)
    git clone https://github.com/FreedomIntelligence/TRIM
    git clone https://github.com/42Shawn/LLaVA-PruMerge
    git clone https://github.com/vbdi/divprune
    python benchmarks/fidelity_vs_authors.py --repos DIR_WITH_THE_FIVE_CLONES \
        [--seeds 2] [--out benchmarks/results/fidelity_vs_authors.csv]

Functions read (file: function): CDPruner llava/model/llava_arch.py: encode_images;
Script Script/llava/model/llava_arch.py: encode_images; TRIM
llava/model/multimodal_encoder/clip_encoder.py: token_reduction; LLaVA-PruMerge
llava/model/multimodal_encoder/clip_encoder.py: token_prune_merge_advanced_plus (with its
module-level helpers); DivPrune LLaVA/llava/model/llava_arch.py: DivPrune.

Inputs: N = 576 tokens (24 x 24), LLM-space D in {1024, 4096}, CLIP width 1024 and
embedding 768 for TRIM / PruMerge+, K in {64, 128, 192} (and 96 = the rank for
`rank96`); feature kinds `random`,
`duplicated` (288 distinct tokens, each twice), `rank96`, `clustered` (16 centres + noise);
TRIM's CLIP image embeddings with equal norms or norms varying +-30 %. Values are compared
in fp64 where the authors' code casts its output to fp16 (TRIM), so that 1e-5 is
meaningful. One CSV row per (method, reference, kind, D, K, seed): `same_set`,
`same_order`, `overlap` (|ours & theirs| / |theirs|), `max_abs_diff` of the rows the LLM
receives (kept / merged / extra), `count_ours` / `count_code` (TRIM, PruMerge+: the
adaptive count), `note`.
"""

from __future__ import annotations

import argparse
import ast
import csv
import math
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm_script.clip_text import CONTEXT_LENGTH  # noqa: F401  (CLIP text context, for the docs)
from vllm_script.methods import (
    apply_selection,
    clip_relevance,
    cls_attention_from_qk,
    divprune_select,
    prumerge_plus_select,
    qcsp_select,
    script_select,
    trim_select,
)

N, GRID = 576, (24, 24)
CLIP_WIDTH, CLIP_EMBED = 1024, 768
FILES = {
    "cdpruner": ("CDPruner", "llava/model/llava_arch.py"),
    "script": ("script.github.io", "Script/llava/model/llava_arch.py"),
    "trim": ("TRIM", "llava/model/multimodal_encoder/clip_encoder.py"),
    "prumerge": ("LLaVA-PruMerge", "llava/model/multimodal_encoder/clip_encoder.py"),
    "divprune": ("divprune", "LLaVA/llava/model/llava_arch.py"),
}
FIELDS = [
    "method", "reference", "kind", "d", "k", "seed", "same_set", "same_order", "overlap",
    "max_abs_diff", "count_ours", "count_code", "note",
]  # fmt: skip


# -- loading the authors' functions ---------------------------------------------------------


def load(path: Path, names: list[str]) -> dict:
    """Exec the named top-level functions / assignments and `Class.method`s of `path`.

    Returns the namespace (torch, nn, F, np in scope, as the authors' modules import them).
    """
    source = path.read_text()
    tree = ast.parse(source)
    namespace: dict = {"torch": torch, "nn": nn, "F": F, "np": np, "math": math}
    found = set()
    for node in tree.body:
        nodes = [(node, None)]
        if isinstance(node, ast.ClassDef):
            nodes = [(child, node.name) for child in node.body]
        for child, owner in nodes:
            if isinstance(child, ast.FunctionDef):
                name = child.name if owner is None else f"{owner}.{child.name}"
            elif isinstance(child, ast.Assign) and owner is None:
                name = ",".join(t.id for t in child.targets if isinstance(t, ast.Name))
            else:
                continue
            if name in names:
                segment = ast.get_source_segment(source, child)
                exec(compile(textwrap.dedent(segment), str(path), "exec"), namespace)
                if owner is not None:
                    namespace[name] = namespace.pop(child.name)
                found.add(name)
    missing = set(names) - found
    if missing:
        raise SystemExit(f"{path}: not found: {sorted(missing)}")
    return namespace


class Identity(nn.Module):
    def forward(self, x):
        return x


# -- inputs ------------------------------------------------------------------------------------


def make_features(kind: str, d: int, gen: torch.Generator) -> torch.Tensor:
    """[N, d] fp64 synthetic tokens of one kind."""
    if kind == "random":
        return torch.randn(N, d, generator=gen, dtype=torch.float64)
    if kind == "duplicated":
        base = torch.randn(N // 2, d, generator=gen, dtype=torch.float64)
        perm = torch.randperm(N, generator=gen)
        return base[perm % (N // 2)]
    if kind == "rank96":
        left = torch.randn(N, 96, generator=gen, dtype=torch.float64)
        return left @ torch.randn(96, d, generator=gen, dtype=torch.float64) / 96**0.5
    if kind == "clustered":
        centres = torch.randn(16, d, generator=gen, dtype=torch.float64)
        assign = torch.randint(0, 16, (N,), generator=gen)
        return centres[assign] + 0.3 * torch.randn(N, d, generator=gen, dtype=torch.float64)
    raise ValueError(kind)


def overlap(ours: list[int], theirs: list[int]) -> float:
    return len(set(ours) & set(theirs)) / max(len(set(theirs)), 1)


def row(method, reference, kind, d, k, seed, ours, theirs, diff=float("nan"), counts=("", ""),
        note=""):  # fmt: skip
    return {
        "method": method,
        "reference": reference,
        "kind": kind,
        "d": d,
        "k": k,
        "seed": seed,
        "same_set": set(ours) == set(theirs) and len(ours) == len(theirs),
        "same_order": list(ours) == list(theirs),
        "overlap": round(overlap(ours, theirs), 4),
        "max_abs_diff": f"{diff:.3g}",
        "count_ours": counts[0],
        "count_code": counts[1],
        "note": note,
    }


# -- CDPruner / Script (QCSP) -----------------------------------------------------------------


def cdpruner_like(encode_images, features, image_embeds, text_embeds, k):
    """Run an authors' `encode_images` with stand-ins: identity projector, given embeds."""
    tower = lambda images, texts=None: (features, image_embeds, text_embeds)  # noqa: E731
    model = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=Identity())
    fake = types.SimpleNamespace(get_model=lambda: model, visual_token_num=k)
    with torch.no_grad():
        _, mask = encode_images(fake, None, texts=["q"])
    return mask[0].nonzero().flatten().tolist()


def compare_qcsp(ns_cd, ns_script, seeds, out):
    for seed in range(seeds):
        for kind in ("random", "duplicated", "rank96", "clustered"):
            for d in (1024, 4096):
                gen = torch.Generator().manual_seed(seed)
                feats = make_features(kind, d, gen).float().unsqueeze(0)
                img = torch.randn(1, N, CLIP_EMBED, generator=gen)
                txt = torch.randn(1, CLIP_EMBED, generator=gen)
                # both codes negate; CDPruner takes cosines, Script raw dot products
                rel = clip_relevance(img, txt, negate=True)
                rel_raw = clip_relevance(img, txt, negate=True, normalize=False)
                for k in (64, 96, 128, 192) if kind == "rank96" else (64, 128, 192):
                    theirs = cdpruner_like(ns_cd["LlavaMetaForCausalLM.encode_images"],
                                           feats, img, txt, k)  # fmt: skip
                    head = cdpruner_like(ns_script["LlavaMetaForCausalLM.encode_images"],
                                         feats, img, txt, k)  # fmt: skip
                    note = "code NaN past the rank" if len(theirs) < k else ""
                    for ref in ("paper", "code"):
                        ours = qcsp_select(feats, rel, k, reference=ref).keep[0].tolist()
                        out.append(row("qcsp", ref, kind, d, k, seed, ours, theirs, note=note))
                        r = rel_raw if ref == "code" else rel
                        mine = script_select(feats, r, k, reference=ref).keep[0].tolist()
                        out.append(row("script", ref, kind, d, k, seed, mine, head))


# -- TRIM -------------------------------------------------------------------------------------


def trim_code(ns, features, proj_embeds_fn, text, ratio):
    """The authors' token_reduction: fp64 features so that no fp16 cast happens."""
    layernorm, projection = proj_embeds_fn
    tower = types.SimpleNamespace(
        vision_model=types.SimpleNamespace(post_layernorm=layernorm),
        visual_projection=projection,
    )
    fake = types.SimpleNamespace(vision_tower=tower, token_reduce_func=f"TRIM:{ratio}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows, dims = ns["CLIPVisionTower.token_reduction"](fake, features, None, text)
    return rows[0, : dims[0]]


def rows_to_indices(rows: torch.Tensor, features: torch.Tensor) -> list[int]:
    """Each row's index among `features` rows (exact copies; first match)."""
    eq = (rows.unsqueeze(1) == features.unsqueeze(0)).all(-1)
    return [int(e.nonzero()[0]) if e.any() else -1 for e in eq]


# TRIM: the paper, the paper with the existing `negate_relevance` flip, the code
VARIANTS = (("paper", None), ("paper", True), ("code", None))


def compare_trim(ns, seeds, out):
    for seed in range(seeds):
        for spread in (0.0, 0.3):
            gen = torch.Generator().manual_seed(100 + seed)
            layernorm = nn.LayerNorm(CLIP_WIDTH).double()
            projection = nn.Linear(CLIP_WIDTH, CLIP_EMBED, bias=False).double()
            with torch.no_grad():
                projection.weight.copy_(
                    torch.randn(CLIP_EMBED, CLIP_WIDTH, generator=gen, dtype=torch.float64) / 32
                )
            feats = torch.randn(1, N, CLIP_WIDTH, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                embeds = F.normalize(projection(layernorm(feats)), dim=-1) * 4.0
            # equal norms, or norms varying by a factor in [1 - spread, 1 + spread]
            embeds = embeds * (1 + spread * (2 * torch.rand(1, N, 1, generator=gen) - 1))
            text = torch.randn(1, CLIP_EMBED, generator=gen, dtype=torch.float64) * 0.3

            def proj(x, e=embeds):  # post_layernorm is the identity: x -> the embeds
                return e

            kind = f"norms+-{int(spread * 100)}%"
            # adaptive: the code's own count; we are given budget = count + 1
            theirs_rows = trim_code(ns, feats, (Identity(), proj), text, -1)
            n_code = theirs_rows.shape[0] - 1
            theirs_idx = rows_to_indices(theirs_rows[:-1], feats[0])
            for ref, negate in VARIANTS:
                sel = trim_select(feats, embeds, text, n_code + 1, reference=ref, negate=negate)
                ours_rows = apply_selection(feats, sel)[0]
                diff = (ours_rows - theirs_rows).abs().max().item()
                ref = ref + ("+negate" if negate else "")
                out.append(row("trim", ref, kind, CLIP_WIDTH, n_code + 1, seed,
                               sel.keep[0].tolist(), theirs_idx, diff,
                               (int(sel.info["iqr_count"][0]), n_code),
                               "adaptive: budget = code count + 1"))  # fmt: skip
            for k in (64, 128, 192):
                theirs_rows = trim_code(ns, feats, (Identity(), proj), text, (k - 1) / N)
                theirs_idx = rows_to_indices(theirs_rows[:-1], feats[0])
                for ref, negate in VARIANTS:
                    sel = trim_select(feats, embeds, text, k, reference=ref, negate=negate)
                    ours_rows = apply_selection(feats, sel)[0]
                    diff = (ours_rows - theirs_rows).abs().max().item()
                    ref = ref + ("+negate" if negate else "")
                    out.append(row("trim", ref, kind, CLIP_WIDTH, k, seed,
                                   sel.keep[0].tolist(), theirs_idx, diff,
                                   note="fixed ratio (k - 1) / N"))  # fmt: skip


# -- PruMerge+ ----------------------------------------------------------------------------------


class FixedProjection(nn.Module):
    """Stands in for a q_proj / k_proj whose output is given (hooks see it)."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, x):
        return self.value


def prumerge_code(ns, hidden, q, k):
    """token_prune_merge_advanced_plus on the CLS + patch rows `hidden` [1, N+1, C]."""
    layers = nn.ModuleList()
    for _ in range(24):
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.q_proj, layer.self_attn.k_proj = FixedProjection(), FixedProjection()
        layers.append(layer)
    layers[23].self_attn.q_proj.value, layers[23].self_attn.k_proj.value = q, k

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = nn.Module()
            self.vision_model.encoder = nn.Module()
            self.vision_model.encoder.layers = layers

        def forward(self, images, output_hidden_states=True):
            layers[23].self_attn.q_proj(images)
            layers[23].self_attn.k_proj(images)
            return types.SimpleNamespace(hidden_states=[images] * 25)

    fake = types.SimpleNamespace(
        vision_tower=Tower(), select_layer=-2, select_feature="patch",
        dtype=hidden.dtype, device=hidden.device,
    )  # fmt: skip
    fake.feature_select = lambda outs: ns["CLIPVisionTower.feature_select"](fake, outs)
    with torch.no_grad():
        return ns["CLIPVisionTower.token_prune_merge_advanced_plus"](fake, hidden)[0]


def compare_prumerge(ns, seeds, out):
    for seed in range(seeds):
        for kind in ("random", "clustered"):
            gen = torch.Generator().manual_seed(200 + seed)
            feats = make_features(kind, CLIP_WIDTH, gen).unsqueeze(0)
            cls = torch.randn(1, 1, CLIP_WIDTH, generator=gen, dtype=torch.float64)
            hidden = torch.cat([cls, feats], dim=1)
            q = torch.randn(1, N + 1, CLIP_WIDTH, generator=gen, dtype=torch.float64)
            k = torch.randn(1, N + 1, CLIP_WIDTH, generator=gen, dtype=torch.float64)
            k[:, 1:] += 2.0 * make_features(kind, CLIP_WIDTH, gen)[None] / 32**0.5
            try:
                theirs = prumerge_code(ns, hidden, q, k)
            except (ZeroDivisionError, RuntimeError) as exc:
                out.append(row("prumerge+", "code", kind, CLIP_WIDTH, 0, seed, [], [],
                               note=f"authors' code raised {type(exc).__name__}"))  # fmt: skip
                continue
            # the kept indices, read off a run on one-hot features (row r's 1.0 is its token)
            one_hot = torch.zeros(1, N + 1, CLIP_WIDTH, dtype=torch.float64)
            one_hot[0, 1:, :N] = torch.eye(N, dtype=torch.float64)
            theirs_idx = prumerge_code(ns, one_hot, q, k)[:-1, :N].argmax(-1).tolist()
            attn = cls_attention_from_qk(q[:, 0], k, num_heads=1, num_prefix=1)
            budget = theirs.shape[0]
            for ref in ("paper", "code"):
                sel = prumerge_plus_select(feats, k[:, 1:], attn, budget, GRID, reference=ref)
                ours_rows = apply_selection(feats, sel)[0]
                diff = (ours_rows - theirs).abs().max().item()
                out.append(row("prumerge+", ref, kind, CLIP_WIDTH, budget, seed,
                               sel.keep[0].tolist(), theirs_idx, diff,
                               (int(sel.info["iqr_count"][0]),
                                int(ns["outlier_dectection"](attn) * N)),
                               "budget = the code's row count"))  # fmt: skip


# -- DivPrune -------------------------------------------------------------------------------------


def compare_divprune(ns, seeds, out):
    for seed in range(seeds):
        for kind in ("random", "duplicated", "rank96", "clustered"):
            for d in (1024, 4096):
                gen = torch.Generator().manual_seed(300 + seed)
                feats = make_features(kind, d, gen).float()
                for k in (64, 128, 192):
                    with torch.no_grad():
                        order, _ = ns["LlavaMetaForCausalLM.DivPrune"](
                            types.SimpleNamespace(
                                pairwise_cosine_similarity=lambda m: ns[
                                    "LlavaMetaForCausalLM.pairwise_cosine_similarity"
                                ](None, m)
                            ),
                            feats, N, None, threshold_ratio=k / N,
                        )  # fmt: skip
                    theirs = order.tolist()
                    note = "code repeats an index" if len(set(theirs)) < k else ""
                    for ref in ("paper", "code"):
                        sel = divprune_select(feats.unsqueeze(0), k, reference=ref)
                        ours = sel.info["order"][0].tolist()
                        out.append(row("divprune", ref, kind, d, k, seed, ours, theirs,
                                       note=note))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=Path, required=True, help="folder with the five clones")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["qcsp", "trim", "prumerge", "divprune"])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/fidelity_vs_authors.csv")
    )
    args = parser.parse_args()
    path = {key: args.repos / repo / file for key, (repo, file) in FILES.items()}
    rows: list[dict] = []
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if "qcsp" in args.methods:
        ns_cd = load(path["cdpruner"], ["LlavaMetaForCausalLM.encode_images"])
        ns_script = load(path["script"], ["LlavaMetaForCausalLM.encode_images"])
        compare_qcsp(ns_cd, ns_script, args.seeds, rows)
    if "trim" in args.methods:
        compare_trim(load(path["trim"], ["CLIPVisionTower.token_reduction"]), args.seeds, rows)
    if "prumerge" in args.methods:
        names = ["complement_idx", "outputs", "hook_k", "hook_q", "outlier_dectection",
                 "CLIPVisionTower.feature_select",
                 "CLIPVisionTower.token_prune_merge_advanced_plus"]  # fmt: skip
        compare_prumerge(load(path["prumerge"], names), args.seeds, rows)
    if "divprune" in args.methods:
        names = ["LlavaMetaForCausalLM.pairwise_cosine_similarity", "LlavaMetaForCausalLM.DivPrune"]
        compare_divprune(load(path["divprune"], names), args.seeds, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    summarise(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


def summarise(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["reference"], r["kind"]), []).append(r)
    for (method, ref, kind), rs in sorted(groups.items()):
        same = sum(r["same_set"] for r in rs)
        order = sum(r["same_order"] for r in rs)
        ov = [r["overlap"] for r in rs]
        diffs = [float(r["max_abs_diff"]) for r in rs if r["max_abs_diff"] != "nan"]
        counted = [r for r in rs if r["count_code"] != ""]
        counts = sum(r["count_ours"] == r["count_code"] for r in counted)
        print(
            f"{method:9s} {ref:12s} {kind:11s} same set {same}/{len(rs)}, same order "
            f"{order}/{len(rs)}, overlap {min(ov):.2f}-{max(ov):.2f}"
            + (f", max |diff| {max(diffs):.2g}" if diffs else "")
            + (f", adaptive count equal {counts}/{len(counted)}" if counted else "")
        )


if __name__ == "__main__":
    main()
