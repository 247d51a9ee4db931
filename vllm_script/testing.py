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


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    fast.save_pretrained(path)


def write_tiny_llava(
    path: str | Path,
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
) -> Path:
    """Write a random-weight LLaVA-1.5-shaped checkpoint; returns its directory.

    Geometry: a CLIP ViT with `(image_size / patch_size)^2` patches (576 at the
    defaults, as LLaVA-1.5-7B), penultimate layer, CLS dropped; a 2-layer MLP projector;
    a Llama decoder with head size `head_dim` (one the CPU attention supports).
    Idempotent: an existing checkpoint written with the same arguments is reused.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    stamp = {
        "seed": seed,
        "image_size": image_size,
        "patch_size": patch_size,
        "vision_hidden": vision_hidden,
        "vision_layers": vision_layers,
        "text_hidden": text_hidden,
        "text_layers": text_layers,
        "head_dim": head_dim,
        "dtype": dtype,
        "init_std": init_std,
    }
    stamp_file = path / "vllm_script_tiny.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return path
    path.mkdir(parents=True, exist_ok=True)

    _write_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    LlavaProcessor(
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
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        initializer_range=init_std,
    )
    config.dtype = dtype
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        # hub layout (what vLLM's weight mapper expects), not transformers 5.x's own
        key = key.replace("model.vision_tower.", "vision_tower.vision_model.")
        key = key.replace("model.language_model.", "language_model.model.")
        key = key.replace("model.multi_modal_projector.", "multi_modal_projector.")
        key = key.replace("lm_head.", "language_model.lm_head.")
        state[key] = value.to(getattr(torch, dtype)).contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    stamp_file.write_text(json.dumps(stamp))
    return path


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
