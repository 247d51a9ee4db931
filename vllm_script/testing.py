"""Tiny offline checkpoints (random weights) for tests, demos and users' own checks.

Nothing here touches a model hub: the tokenizer is trained on a few sentences with the
`tokenizers` library, the weights are random, and the files are written in the hub
layout vLLM loads. Usage:

    from vllm_script.testing import model_preset, write_tiny_llava
    path = write_tiny_llava("/tmp/tiny-llava")                        # the tests' model
    path = write_tiny_llava("/tmp/bench-llava", **model_preset("bench"))  # the benchmarks'
    # LLM(model=str(path), ...)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Words the tiny tokenizer knows (plus the chat template's); anything else is <unk>.
_CORPUS = """
what is in the image describe this picture how many objects are there which color is the
car where is the cat on the table a dog runs in a park red blue green yellow black white
left right top bottom center count people trees sky is it day or night read the text sign
question answer yes no one two three four five many few small large big near far behind
front of and the a an to with what's is are was were show me tell about please USER
ASSISTANT : , . ? !
"""
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _write_tokenizer(
    path: Path,
    *,
    special_tokens: list[str] = SPECIAL_TOKENS,
    named_tokens: dict[str, str] | None = None,
    chat_template: str = LLAVA_CHAT_TEMPLATE,
    eos_token: str = "</s>",
    extra_words: str = "",
) -> None:
    """A word-level tokenizer trained on `_CORPUS` (+ `extra_words` and the special
    tokens), saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=special_tokens)
    tok.train_from_iterator([_CORPUS + " user assistant system " + extra_words], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>" if "<s>" in special_tokens else None,
        eos_token=eos_token,
        pad_token="<pad>",
        extra_special_tokens=named_tokens or {"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = chat_template
    fast.save_pretrained(path)


TINY_FORMAT = 2  # bump when the writers change what they write

# Named model sizes, for every writer below (keyword arguments they all take). The image
# geometry (tokens per image) is the writer's; these size the towers.
MODEL_PRESETS: dict[str, dict[str, object]] = {
    # the tests' model (the writers' defaults): engines start fast; the selection step
    # costs about what the prefill saves, so pruning hardly pays here
    "tiny": {
        "text_hidden": 128,
        "text_layers": 2,
        "head_dim": 64,
        "init_std": 0.2,
        "vision_hidden": 64,
        "vision_layers": 2,
    },
    # an 8-layer, width-1024 decoder (~150M parameters): the prefill is what pruning saves
    "small": {
        "text_hidden": 1024,
        "text_layers": 8,
        "head_dim": 128,
        "init_std": 0.02,
        "vision_hidden": 64,
        "vision_layers": 2,
    },
    # "small" with a 4-layer, width-256 vision tower, so vision + projector cost about what
    # a ViT-L costs next to a 7B LLM (~4 % of the unpruned prefill's FLOPs): the demo's
    # and the serving benchmark's model
    "bench": {
        "text_hidden": 1024,
        "text_layers": 8,
        "head_dim": 128,
        "init_std": 0.02,
        "vision_hidden": 256,
        "vision_layers": 4,
    },
}


def model_preset(name: str) -> dict[str, object]:
    """The writers' size arguments for preset `name` (a copy): `tiny`, `small` or `bench`."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(MODEL_PRESETS)}")
    return dict(MODEL_PRESETS[name])


def write_tiny_llava(path: str | Path, **kwargs) -> Path:
    """Write a random-weight LLaVA-1.5-shaped checkpoint; returns its directory.

    Geometry: a CLIP ViT with `(image_size / patch_size)^2` patches (576 at the
    defaults, as LLaVA-1.5-7B), penultimate layer, CLS dropped; a 2-layer MLP projector;
    a Llama decoder with head size `head_dim` (one the CPU attention supports).
    Keyword arguments: see `_write_llava_family`. Idempotent: an existing checkpoint
    written with the same arguments is reused.
    """
    return _write_llava_family(path, "llava", **kwargs)


def write_tiny_llava_next(
    path: str | Path, *, image_size: int = 112, grid_pinpoints: list | None = None, **kwargs
) -> Path:
    """Write a random-weight LLaVA-NeXT (any-resolution) checkpoint; returns its directory.

    Defaults are small for tests: 112-px crops of 14-px patches (64 tokens per crop) and
    pinpoints up to 2x2 crops, so an image is base crop + tiles + one newline per row
    (e.g. 64 + 256 + 16 = 336 tokens for a square image). Pass `image_size=336` and the
    LLaVA-NeXT pinpoints for the real geometry (2880 tokens at 672x672).
    """
    pinpoints = grid_pinpoints or [
        [image_size, 2 * image_size],
        [2 * image_size, image_size],
        [2 * image_size, 2 * image_size],
    ]
    return _write_llava_family(
        path, "llava_next", image_size=image_size, grid_pinpoints=pinpoints, **kwargs
    )


def _write_llava_family(
    path: str | Path,
    arch: str,
    *,
    seed: int = 0,
    image_size: int = 336,
    patch_size: int = 14,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    text_hidden: int = 128,
    text_layers: int = 2,
    head_dim: int = 64,
    dtype: str = "bfloat16",
    init_std: float = 0.2,
    grid_pinpoints: list | None = None,
) -> Path:
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    path = Path(path)
    stamp = {
        "format": TINY_FORMAT,
        "arch": arch,
        "seed": seed,
        "image_size": image_size,
        "patch_size": patch_size,
        "vision": [vision_hidden, vision_layers],
        "text": [text_hidden, text_layers, head_dim],
        "dtype": dtype,
        "init_std": init_std,
        "grid_pinpoints": grid_pinpoints,
    }
    if _stamp_matches(path, stamp):
        return path

    _write_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    crop = {"height": image_size, "width": image_size}
    if arch == "llava":
        image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
        processor_cls, config_cls, model_cls = (
            LlavaProcessor,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )
        extra_config = {}
    else:
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": image_size}, crop_size=crop, image_grid_pinpoints=grid_pinpoints
        )
        processor_cls, config_cls = LlavaNextProcessor, LlavaNextConfig
        model_cls = LlavaNextForConditionalGeneration
        extra_config = {"image_grid_pinpoints": grid_pinpoints}
    processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    ).save_pretrained(path)

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_hidden // head_dim,
        num_key_value_heads=text_hidden // head_dim,
        head_dim=head_dim,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    config = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        initializer_range=init_std,
        **extra_config,
    )

    def random_newline(model):  # random, not zero: a zero newline is a degenerate token
        model.model.image_newline.normal_(std=init_std)

    renames = [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.language_model.", "language_model.model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
        ("lm_head.", "language_model.lm_head."),
    ]
    tweak = random_newline if arch == "llava_next" else None
    return _build_and_save(
        path, stamp, config, model_cls, seed=seed, dtype=dtype, renames=renames, tweak=tweak
    )


QWEN_SPECIAL_TOKENS = [
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<pad>",
]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def write_tiny_qwen2_5_vl(
    path: str | Path,
    *,
    seed: int = 0,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    text_hidden: int = 128,
    text_layers: int = 2,
    head_dim: int = 64,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 64,
    dtype: str = "bfloat16",
    init_std: float = 0.2,
) -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint (images and video); returns its dir.

    Images are resized to between `min_pixels` and `max_pixels` (28-px units after the
    2x2 merge), so one image is 4 to 64 LLM tokens at the defaults; a video of T frames
    gives T/2 temporal patches of the same grid. Idempotent like `write_tiny_llava`.
    """
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    stamp = {
        "format": TINY_FORMAT,
        "arch": "qwen2_5_vl",
        "seed": seed,
        "vision": [vision_hidden, vision_layers],
        "text": [text_hidden, text_layers, head_dim],
        "pixels": [min_pixels, max_pixels],
        "dtype": dtype,
        "init_std": init_std,
    }
    if _stamp_matches(path, stamp):
        return path

    _write_tokenizer(
        path,
        special_tokens=QWEN_SPECIAL_TOKENS,
        named_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        chat_template=QWEN_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    pixels = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels),
        video_processor=Qwen2VLVideoProcessor(size=pixels),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    ).save_pretrained(path)

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": vision_layers,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": max(1, vision_hidden // 32),
            "out_hidden_size": text_hidden,
            "fullatt_block_indexes": [vision_layers - 1],
            "window_size": 112,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "patch_size": 14,
            "tokens_per_second": 2,
            "initializer_range": init_std,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_hidden // head_dim,
            "num_key_value_heads": text_hidden // head_dim,
            "max_position_embeddings": 8192,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
            },
            "initializer_range": init_std,
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<pad>"),
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return _build_and_save(
        path, stamp, config, Qwen2_5_VLForConditionalGeneration, seed=seed, dtype=dtype
    )


def write_tiny_qwen3_vl(
    path: str | Path,
    *,
    seed: int = 0,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    deepstack_layers: tuple[int, ...] = (0, 1),
    text_hidden: int = 128,
    text_layers: int = 2,
    head_dim: int = 64,
    min_pixels: int = 32 * 32 * 4,
    max_pixels: int = 32 * 32 * 64,
    max_position_embeddings: int = 8192,
    num_experts: int = 0,
    dtype: str = "bfloat16",
    init_std: float = 0.2,
) -> Path:
    """Write a random-weight Qwen3-VL checkpoint (images, video, deepstack); returns its dir.

    `num_experts` > 0 writes Qwen3-VL-MoE instead (every decoder MLP a mixture of that
    many experts, two per token).

    16-px patches merged 2x2, so one LLM token per 32x32 pixels; images are resized to
    between `min_pixels` and `max_pixels` (4 to 64 tokens at the defaults), a video of
    T frames gives T/2 frames of the same grid, each after its timestamp text. The
    vision tower's `deepstack_layers` feed deepstack features to the first LLM layers.
    Idempotent like `write_tiny_llava`.
    """
    from transformers import (
        AutoTokenizer,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    path = Path(path)
    stamp = {
        "format": TINY_FORMAT,
        "arch": "qwen3_vl",
        "experts": num_experts,
        "seed": seed,
        "vision": [vision_hidden, vision_layers, list(deepstack_layers)],
        "text": [text_hidden, text_layers, head_dim, max_position_embeddings],
        "pixels": [min_pixels, max_pixels],
        "dtype": dtype,
        "init_std": init_std,
    }
    if _stamp_matches(path, stamp):
        return path

    _write_tokenizer(
        path,
        special_tokens=QWEN_SPECIAL_TOKENS,
        named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        chat_template=QWEN_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        extra_words="seconds < > 0 1 2 3 4 5 6 7 8 9",  # the timestamps "<1.5 seconds>"
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    pixels = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=16, merge_size=2),
        video_processor=Qwen3VLVideoProcessor(size=pixels, patch_size=16, merge_size=2),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    ).save_pretrained(path)

    ids = tokenizer.convert_tokens_to_ids
    moe = {}
    if num_experts:
        moe = {"num_experts": num_experts, "num_experts_per_tok": 2}
        moe |= {"moe_intermediate_size": text_hidden // 2, "norm_topk_prob": True}
    config_cls, model_cls = (
        (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)
        if num_experts
        else (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    )
    config = config_cls(
        vision_config={
            "depth": vision_layers,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": max(1, vision_hidden // 32),
            "out_hidden_size": text_hidden,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": list(deepstack_layers),
            "initializer_range": init_std,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_hidden // head_dim,
            "num_key_value_heads": text_hidden // head_dim,
            "head_dim": head_dim,
            "max_position_embeddings": max_position_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [3 * head_dim // 16, 5 * head_dim // 32, 5 * head_dim // 32],
                "mrope_interleaved": True,
            },
            "initializer_range": init_std,
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<pad>"),
            **moe,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    # the hub stores fused experts as [E, hidden, 2I] / [E, I, hidden], transformers as
    # their transposes
    experts = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj") if num_experts else ()
    return _build_and_save(
        path, stamp, config, model_cls, seed=seed, dtype=dtype, transposed=experts
    )


def random_video(seed: int, frames: int = 4, width: int = 112, height: int = 112):
    """(frames uint8 [T, H, W, 3], metadata) as vLLM takes a video: smooth random blobs
    drifting across frames."""
    base = np.asarray(random_image(seed, width + 8 * frames, height))
    array = np.stack([base[:, 8 * t : 8 * t + width] for t in range(frames)])
    metadata = {
        "fps": 2.0,
        "duration": frames / 2.0,
        "total_num_frames": frames,
        "frames_indices": list(range(frames)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    return array, metadata


def _save_hub_layout(
    model, path: Path, dtype: str, renames: list[tuple[str, str]], transposed: tuple = ()
) -> None:
    """Save `model`'s weights under the hub's key names (what vLLM's weight mappers expect;
    transformers 5.x saves its own layout); keys ending in one of `transposed` are saved
    with their last two dimensions swapped."""
    import torch
    from safetensors.torch import save_file

    state = {}
    for key, value in model.state_dict().items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        if key.endswith(transposed):
            value = value.transpose(-1, -2)
        state[key] = value.to(getattr(torch, dtype)).contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def random_image(seed: int, width: int = 336, height: int = 336):
    """A PIL RGB image of smooth random colour blobs (deterministic in `seed`).

    Blobs, not white noise: neighbouring patches look alike, as in real photos, so
    GSP has redundancy to find.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    return img.convert("RGB")


# ---- tiny checkpoints for the generic 1-D adapter (vllm_script.models.generic) ----

# Chat markup per family, kept minimal: engine tests write prompts by hand.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ image_tag }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
CHATML_TOKENS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def _chatml(image_tag: str) -> str:
    return "{% set image_tag = '" + image_tag + "' %}" + CHATML_TEMPLATE


STAMP_FILE = "vllm_script_tiny.json"  # what a tiny checkpoint was written with


def _stamp_matches(path: Path, stamp: dict) -> bool:
    """True if `path` holds a checkpoint written with `stamp` (else prepare the directory)."""
    stamp_file = path / STAMP_FILE
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return True
    path.mkdir(parents=True, exist_ok=True)
    return False


def _build_and_save(
    path: Path,
    stamp: dict,
    config,
    model_cls,
    *,
    seed: int,
    dtype: str,
    renames: list[tuple[str, str]] = (),
    transposed: tuple = (),
    tweak=None,
) -> Path:
    """The writers' common tail: build `model_cls(config)` from `seed` (then `tweak(model)`
    without grad), save its weights in the hub layout, the config and the stamp."""
    import torch

    config.dtype = dtype
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    _save_hub_layout(model, path, dtype, list(renames), transposed=transposed)
    config.save_pretrained(path)
    (path / STAMP_FILE).write_text(json.dumps(stamp))
    return path


def _fill_zero_matrices(model, std: float) -> None:
    """Random normal(0, std) for weight matrices transformers initialises to zero (e.g.
    Gemma 3's projector): a zero projector makes every image the same to the LLM."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, std)


def _qwen2_text_config(tokenizer, text_hidden: int, text_layers: int, head_dim: int, std: float):
    ids = tokenizer.convert_tokens_to_ids
    return {
        "model_type": "qwen2",
        "vocab_size": len(tokenizer),
        "hidden_size": text_hidden,
        "intermediate_size": 2 * text_hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_hidden // head_dim,
        "num_key_value_heads": text_hidden // head_dim,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "initializer_range": std,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<pad>"),
    }


def write_tiny_gemma3(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 224,
    patch_size: int = 14,
    tokens_per_image: int = 64,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    text_hidden: int = 128,
    text_layers: int = 2,
    head_dim: int = 64,
    dtype: str = "bfloat16",
    init_std: float = 0.2,
) -> Path:
    """Write a random-weight Gemma 3 (`Gemma3ForConditionalGeneration`) checkpoint.

    A SigLIP tower sees `image_size` px (every image is resized to it), its
    `(image_size / patch_size)^2` patches are average-pooled to `tokens_per_image` tokens
    (64 at the defaults; 256 in the released models); the image enters the prompt as
    `\\n\\n<start_of_image>` + that many `<image_soft_token>` + `<end_of_image>\\n\\n`. The
    decoder alternates a sliding-window and a full-attention layer. Idempotent like
    `write_tiny_llava`.
    """
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    path = Path(path)
    stamp = {
        "format": TINY_FORMAT,
        "arch": "gemma3",
        "seed": seed,
        "image": [image_size, patch_size, tokens_per_image],
        "vision": [vision_hidden, vision_layers],
        "text": [text_hidden, text_layers, head_dim],
        "dtype": dtype,
        "init_std": init_std,
    }
    if _stamp_matches(path, stamp):
        return path
    boi, eoi, soft = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    # vLLM's Gemma 3 processor merges newline runs: "\n" to "\n\n\n\n" must be tokens
    newlines = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
    template = (
        "{% for message in messages %}<start_of_turn>{{ message['role'] }} "
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<start_of_image>"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
    )
    _write_tokenizer(
        path,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", boi, eoi, soft]
        + ["<start_of_turn>", "<end_of_turn>"]
        + newlines,
        named_tokens={"boi_token": boi, "eoi_token": eoi, "image_token": soft},
        chat_template=template,
        eos_token="<end_of_turn>",
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=tokens_per_image,
    ).save_pretrained(path)
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_hidden // head_dim,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "sliding_window": 512,
            "layer_types": ["sliding_attention", "full_attention"] * (text_layers // 2)
            + ["full_attention"] * (text_layers % 2),
            "max_position_embeddings": 8192,
            "initializer_range": init_std,
            "bos_token_id": ids("<s>"),
            "eos_token_id": ids("<end_of_turn>"),
            "pad_token_id": ids("<pad>"),
        },
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": max(1, vision_hidden // 32),
            "image_size": image_size,
            "patch_size": patch_size,
            "vision_use_head": False,
        },
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids(boi),
        eoi_token_index=ids(eoi),
        image_token_index=ids(soft),
        initializer_range=init_std,
    )

    def tweak(model):
        _fill_zero_matrices(model, init_std)
        # Gemma scales input embeddings by sqrt(hidden) and ties the LM head to them:
        # with embeddings as large as the other weights, a random decoder keeps repeating
        # its last input token whatever the image
        model.get_input_embeddings().weight.mul_(0.1)

    renames = [("model.vision_tower.", "model.vision_tower.vision_model.")]
    return _build_and_save(
        path, stamp, config, Gemma3ForConditionalGeneration, seed=seed, dtype=dtype,
        renames=renames, tweak=tweak,
    )  # fmt: skip


def write_tiny_internvl(
    path: str | Path,
    *,
    seed: int = 0,
    tile_size: int = 224,
    patch_size: int = 14,
    max_tiles: int = 4,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    text_hidden: int = 128,
    text_layers: int = 2,
    head_dim: int = 64,
    dtype: str = "bfloat16",
    init_std: float = 0.2,
) -> Path:
    """Write a random-weight InternVL (`InternVLForConditionalGeneration`, the
    transformers-format InternVL 3) checkpoint with a Qwen2 decoder.

    An image is cut into up to `max_tiles` tiles of `tile_size` px (plus a thumbnail when
    there is more than one); each tile gives `(tile_size / patch_size)^2 / 4` tokens
    after the pixel shuffle (64 at the defaults, 256 in the released models). The image
    enters the prompt as `<img>` + tiles x 64 `<IMG_CONTEXT>` + `</img>`: one run.
    """
    from transformers import (
        AutoTokenizer,
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    path = Path(path)
    stamp = {
        "format": TINY_FORMAT,
        "arch": "internvl",
        "seed": seed,
        "image": [tile_size, patch_size, max_tiles],
        "vision": [vision_hidden, vision_layers],
        "text": [text_hidden, text_layers, head_dim],
        "dtype": dtype,
        "init_std": init_std,
    }
    if _stamp_matches(path, stamp):
        return path
    start, end, context, video = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
    template = _chatml("<image>\\n")
    _write_tokenizer(
        path,
        special_tokens=CHATML_TOKENS + [start, end, context, video, "<image>"],
        named_tokens={
            "start_image_token": start,
            "end_image_token": end,
            "context_image_token": context,
            "video_token": video,
        },
        chat_template=template,
        eos_token="<|im_end|>",
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    size = {"height": tile_size, "width": tile_size}
    tokens_per_tile = (tile_size // patch_size) ** 2 // 4
    InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=size, crop_to_patches=True, min_patches=1, max_patches=max_tiles
        ),
        video_processor=InternVLVideoProcessor(size=size),
        tokenizer=tokenizer,
        image_seq_length=tokens_per_tile,
        chat_template=template,
    ).save_pretrained(path)
    config = InternVLConfig(
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": max(1, vision_hidden // 32),
            "image_size": [tile_size, tile_size],
            "patch_size": [patch_size, patch_size],
            "initializer_range": init_std,
        },
        text_config=_qwen2_text_config(tokenizer, text_hidden, text_layers, head_dim, init_std),
        image_token_id=tokenizer.convert_tokens_to_ids(context),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    return _build_and_save(
        path, stamp, config, InternVLForConditionalGeneration, seed=seed, dtype=dtype
    )


def write_tiny_llava_onevision(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 112,
    patch_size: int = 14,
    grid_pinpoints: list | None = None,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    text_hidden: int = 128,
    text_layers: int = 2,
    head_dim: int = 64,
    dtype: str = "bfloat16",
    init_std: float = 0.2,
) -> Path:
    """Write a random-weight LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`)
    checkpoint: a SigLIP tower, any-resolution crops, a Qwen2 decoder.

    Defaults are small: `image_size`-px crops of `patch_size`-px patches (64 tokens per
    crop) and pinpoints up to 2x2 crops, so an image is base crop + unpadded tiles + one
    newline per row (the released models: 384-px crops, 729 tokens each, pinpoints up to
    6x6 crops, tiles pooled down past 9 crops' worth by `anyres_max_9`). The image enters
    the prompt as N `<image>` tokens: one run.
    """
    from transformers import (
        AutoTokenizer,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    path = Path(path)
    stamp = {
        "format": TINY_FORMAT,
        "arch": "llava_onevision",
        "seed": seed,
        "image": [image_size, patch_size],
        "grid_pinpoints": grid_pinpoints,
        "vision": [vision_hidden, vision_layers],
        "text": [text_hidden, text_layers, head_dim],
        "dtype": dtype,
        "init_std": init_std,
    }
    if _stamp_matches(path, stamp):
        return path
    template = _chatml("<image>\\n")
    _write_tokenizer(
        path,
        special_tokens=CHATML_TOKENS + ["<image>", "<video>", "\n"],  # "\n" after each image
        named_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=template,
        eos_token="<|im_end|>",
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    pinpoints = grid_pinpoints or [
        [image_size, 2 * image_size],
        [2 * image_size, image_size],
        [2 * image_size] * 2,
    ]
    size = {"height": image_size, "width": image_size}
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=template,
    ).save_pretrained(path)
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": max(1, vision_hidden // 32),
            "image_size": image_size,
            "patch_size": patch_size,
            "vision_use_head": False,
        },
        text_config=_qwen2_text_config(tokenizer, text_hidden, text_layers, head_dim, init_std),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )

    def random_newline(model):  # random, not zero: a zero newline is a degenerate token
        model.model.image_newline.normal_(std=init_std)

    renames = [("model.vision_tower.", "model.vision_tower.vision_model.")]
    return _build_and_save(
        path, stamp, config, LlavaOnevisionForConditionalGeneration, seed=seed, dtype=dtype,
        renames=renames, tweak=random_newline,
    )  # fmt: skip


def write_tiny_qwen2_vl(
    path: str | Path,
    *,
    seed: int = 0,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    text_hidden: int = 128,
    text_layers: int = 2,
    head_dim: int = 64,
    dtype: str = "bfloat16",
    init_std: float = 0.2,
) -> Path:
    """Write a random-weight Qwen2-VL (`Qwen2VLForConditionalGeneration`) checkpoint: an
    architecture vllm-script does not prune (M-RoPE without an adapter), for the tests of
    what the plugin says about such a model. Images as `write_tiny_qwen2_5_vl`'s."""
    from transformers import (
        AutoTokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    stamp = {
        "format": TINY_FORMAT,
        "arch": "qwen2_vl",
        "seed": seed,
        "dims": [vision_hidden, vision_layers, text_hidden, text_layers, head_dim],
        "dtype": dtype,
        "init_std": init_std,
    }
    if _stamp_matches(path, stamp):
        return path
    _write_tokenizer(
        path,
        special_tokens=QWEN_SPECIAL_TOKENS,
        named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        chat_template=QWEN_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    pixels = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64}
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels),
        video_processor=Qwen2VLVideoProcessor(size=pixels),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    ).save_pretrained(path)
    ids = tokenizer.convert_tokens_to_ids
    text = _qwen2_text_config(tokenizer, text_hidden, text_layers, head_dim, init_std)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1e6,
        "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
    }
    config = Qwen2VLConfig(
        vision_config={
            "depth": vision_layers,
            "embed_dim": vision_hidden,
            "hidden_size": text_hidden,
            "mlp_ratio": 2,
            "num_heads": max(1, vision_hidden // 32),
            "initializer_range": init_std,
        },
        text_config={k: v for k, v in text.items() if k != "model_type"},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return _build_and_save(
        path, stamp, config, Qwen2VLForConditionalGeneration, seed=seed, dtype=dtype
    )
