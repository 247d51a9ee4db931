"""CLIP relevance: the question's CLIP text embedding and the patches' CLIP image embeddings.

LLaVA checkpoints carry CLIP's vision tower but not its text tower nor its visual
projection; the user points `clip_path` at a local Hugging Face CLIP checkpoint (e.g.
openai/clip-vit-large-patch14-336 for LLaVA-1.5). Only the text tower, the two
projections and the vision tower's `post_layernorm` are kept after loading.
No vLLM imports here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CONTEXT_LENGTH = 77  # CLIP's text context: BOS + 75 tokens + EOT


class ClipCheckpointError(ValueError):
    """The CLIP checkpoint directory is missing, is not a CLIP checkpoint, or does not fit."""


@dataclass
class ClipRelevance:
    """A CLIP text tower + projections, ready to embed questions and patches."""

    tokenizer: object
    text_model: nn.Module  # transformers' CLIPTextTransformer (ends with final_layer_norm)
    text_projection: nn.Linear
    visual_projection: nn.Linear
    post_layernorm: nn.LayerNorm  # the CLIP checkpoint's vision post-layernorm
    context_length: int = CONTEXT_LENGTH

    @property
    def device(self) -> torch.device:
        return self.text_projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.weight.dtype

    @property
    def vision_width(self) -> int:
        return self.visual_projection.in_features

    @property
    def embed_dim(self) -> int:
        return self.text_projection.out_features

    def _segments(self, question: str) -> list[list[int]]:
        ids = self.tokenizer(question, add_special_tokens=False)["input_ids"]
        size = self.context_length - 2
        return [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]

    @torch.no_grad()
    def text_segment_embeds(self, questions: list[str]) -> list[torch.Tensor]:
        """B questions -> B tensors [T_b, E]: projected EOT embedding of each segment.

        A question's tokens (no special tokens) are cut into consecutive segments of
        `context_length - 2` (75) tokens; each is run as BOS + segment + EOT, and the
        final-layer-normed hidden state at its EOT position goes through
        `text_projection`. An empty question is one segment (BOS, EOT).
        """
        if isinstance(questions, str) or not all(isinstance(q, str) for q in questions):
            raise TypeError("questions must be a list of strings")
        tok = self.tokenizer
        bos, eos = tok.bos_token_id, tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        segments = [self._segments(q) for q in questions]
        flat = [s for segs in segments for s in segs]
        if not flat:
            return []
        length = max(len(s) for s in flat) + 2
        input_ids = torch.full((len(flat), length), pad, dtype=torch.long)
        mask = torch.zeros(len(flat), length, dtype=torch.long)
        for row, seg in enumerate(flat):
            input_ids[row, : len(seg) + 2] = torch.tensor([bos, *seg, eos])
            mask[row, : len(seg) + 2] = 1
        hidden = self.text_model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state
        eot = torch.tensor([len(s) + 1 for s in flat], device=self.device)
        pooled = hidden[torch.arange(len(flat), device=self.device), eot]
        embeds = self.text_projection(pooled)
        return list(embeds.split([len(segs) for segs in segments]))

    @torch.no_grad()
    def text_embeds(self, questions: list[str]) -> torch.Tensor:
        """B questions -> [B, E]: the mean of the L2-normalised segment embeddings.

        Questions longer than one CLIP context (75 tokens) are split into 77-token
        segments (see `text_segment_embeds`); a one-segment question gives its unit-norm
        projected EOT embedding. The mean is not renormalised (cosine users don't care).
        """
        per_question = self.text_segment_embeds(questions)
        if not per_question:
            return torch.empty(0, self.embed_dim, device=self.device, dtype=self.dtype)
        return torch.stack([F.normalize(e.float(), dim=-1).mean(dim=0) for e in per_question]).to(
            self.dtype
        )

    @torch.no_grad()
    def image_embeds(
        self, patch_features: torch.Tensor, post_layernorm: nn.Module | None = None
    ) -> torch.Tensor:
        """[B, N, Dv] -> [B, N, E]: `visual_projection(post_layernorm(patch_features))`.

        `patch_features`: the vision tower's penultimate-layer patch outputs.
        `post_layernorm`: the vision tower's own post-layernorm if the caller has it;
        None uses the CLIP checkpoint's. Output in this object's dtype and device.
        """
        if not isinstance(patch_features, torch.Tensor) or patch_features.dim() != 3:
            shape = getattr(patch_features, "shape", type(patch_features).__name__)
            raise ValueError(f"patch_features must have shape [B, N, Dv], got {shape}")
        if patch_features.shape[-1] != self.vision_width:
            raise ValueError(
                f"patch_features width {patch_features.shape[-1]} != the CLIP checkpoint's "
                f"vision width {self.vision_width}"
            )
        norm = self.post_layernorm if post_layernorm is None else post_layernorm
        x = patch_features.to(self.device)
        param = next(norm.parameters(), None)
        x = norm(x.to(param.dtype if param is not None else self.dtype))
        return self.visual_projection(x.to(self.dtype))


def _read_clip_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise ClipCheckpointError(
            f"CLIP checkpoint directory {path!r} does not exist (or is not a directory); "
            f"'clip_path' must name a local Hugging Face CLIP checkpoint"
        )
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ClipCheckpointError(
            f"{path!r} is not a Hugging Face checkpoint: it has no config.json; "
            f"'clip_path' must name a CLIP checkpoint directory (model_type 'clip')"
        )
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ClipCheckpointError(f"cannot read {config_file!r}: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip":
        raise ClipCheckpointError(
            f"{path!r} is not a CLIP checkpoint: config.json has model_type "
            f"{model_type!r}, expected 'clip' (a CLIPModel with text and vision towers)"
        )
    return config


def check_clip_checkpoint(path: str | os.PathLike, vision_width: int):
    """Check (config only, no weights) that `path` is a CLIP checkpoint of `vision_width`.

    Returns its `CLIPConfig`. Raises ClipCheckpointError naming the path when it is
    missing or not a CLIP checkpoint, and naming both widths when they differ. Cheap
    enough for the front-end to call at start-up.
    """
    from transformers import CLIPConfig

    path = os.fspath(path)
    if isinstance(vision_width, bool) or not isinstance(vision_width, int) or vision_width < 1:
        raise ValueError(f"vision_width={vision_width!r} is not allowed; it must be an int >= 1")
    _read_clip_config(path)
    config = CLIPConfig.from_pretrained(path)
    ckpt_width = config.vision_config.hidden_size
    if ckpt_width != vision_width:
        raise ClipCheckpointError(
            f"CLIP checkpoint {path!r} has vision hidden size {ckpt_width}, but the model's "
            f"vision tower has width {vision_width}; use the CLIP checkpoint the model's "
            f"vision tower comes from"
        )
    return config


def load_clip_relevance(
    path: str | os.PathLike,
    vision_width: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ClipRelevance:
    """Load the CLIP text tower, projections and vision post-layernorm from `path`.

    `vision_width`: the served model's vision-tower hidden size; the checkpoint's
    `vision_config.hidden_size` must equal it (the patches are projected by this
    checkpoint's `visual_projection`). Raises ClipCheckpointError (a ValueError) naming
    the path when it is missing or not a CLIP checkpoint, and naming both widths when
    they differ. The whole CLIPModel is read once; the vision encoder is then dropped.
    """
    from transformers import AutoTokenizer, CLIPModel

    path = os.fspath(path)
    config = check_clip_checkpoint(path, vision_width)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable tokenizer"
        raise ClipCheckpointError(f"cannot load a CLIP tokenizer from {path!r}: {exc}") from exc
    try:
        model = CLIPModel.from_pretrained(path, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise ClipCheckpointError(f"cannot load CLIP weights from {path!r}: {exc}") from exc
    context = min(CONTEXT_LENGTH, config.text_config.max_position_embeddings)
    parts = ClipRelevance(
        tokenizer=tokenizer,
        text_model=model.text_model,
        text_projection=model.text_projection,
        visual_projection=model.visual_projection,
        post_layernorm=model.vision_model.post_layernorm,
        context_length=context,
    )
    for module in (parts.text_model, parts.text_projection, parts.visual_projection):
        module.to(device=device).eval()
    parts.post_layernorm.to(device=device).eval()
    del model
    return parts


def _byte_level_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def write_tiny_clip_checkpoint(
    path: str | os.PathLike,
    vision_width: int,
    *,
    text_width: int = 32,
    projection_dim: int = 16,
    num_layers: int = 1,
    seed: int = 0,
) -> str:
    """Write a tiny random CLIPModel + CLIP tokenizer to `path` (offline); return the path.

    The tokenizer is transformers' CLIPTokenizer over a byte-level vocabulary with no
    merges (every character is a token; 514 ids incl. BOS/EOT), loadable with
    AutoTokenizer. Weights are random (seeded; the global RNG is left untouched).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = os.fspath(path)
    vocab = _byte_level_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": text_width,
            "intermediate_size": 2 * text_width,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2 if text_width % 2 == 0 else 1,
            "max_position_embeddings": CONTEXT_LENGTH,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": 2 * vision_width,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2 if vision_width % 2 == 0 else 1,
            "image_size": 28,
            "patch_size": 14,
        },
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return path
