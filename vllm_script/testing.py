"""Tiny offline checkpoints (random weights) for tests, demos and users' own checks.

Nothing here touches a model hub: the tokenizer is trained on a few sentences with the
`tokenizers` library, the weights are random, and the files are written in the hub
layout vLLM loads. Usage:

    from vllm_script.testing import write_tiny_llava
    path = write_tiny_llava("/tmp/tiny-llava")
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
    import torch
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
    stamp_file = path / "vllm_script_tiny.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return path
    path.mkdir(parents=True, exist_ok=True)

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
    config.dtype = dtype
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if arch == "llava_next":  # random, not zero: a zero newline is a degenerate token
        with torch.no_grad():
            model.model.image_newline.normal_(std=init_std)
    _save_hub_layout(
        model,
        path,
        dtype,
        [
            ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.language_model.", "language_model.model."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.image_newline", "image_newline"),
            ("lm_head.", "language_model.lm_head."),
        ],
    )
    config.save_pretrained(path)
    stamp_file.write_text(json.dumps(stamp))
    return path


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
    import torch
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
    stamp_file = path / "vllm_script_tiny.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return path
    path.mkdir(parents=True, exist_ok=True)

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
    config.dtype = dtype
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _save_hub_layout(model, path, dtype, [])
    config.save_pretrained(path)
    stamp_file.write_text(json.dumps(stamp))
    return path


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
    import torch
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
    stamp_file = path / "vllm_script_tiny.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return path
    path.mkdir(parents=True, exist_ok=True)

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
    config.dtype = dtype
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # the hub stores fused experts as [E, hidden, 2I] / [E, I, hidden], transformers as
    # their transposes
    experts = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj") if num_experts else ()
    _save_hub_layout(model, path, dtype, [], transposed=experts)
    config.save_pretrained(path)
    stamp_file.write_text(json.dumps(stamp))
    return path


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
