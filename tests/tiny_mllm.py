"""A really tiny, randomly initialised LLaVA-style MLLM, built offline and saved with ``save_pretrained``.

The extraction tests load it back through ``AutoProcessor`` / ``AutoModelForImageTextToText``
from a local directory, so the same loading code a user runs on a real 7B model runs here.
Nothing is downloaded: the tokenizer is a byte-level BPE trained in memory on a few sentences,
the image processor is a plain ``CLIPImageProcessor`` and the weights are random.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]

# Role markers written by the template mirror LLaVA-1.5's "USER: <image>\n... ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = [
    "Describe the salient visual attributes of the main object in this image: colour, shape, texture, parts.",
    "a small red round object with a smooth shiny surface and a thin stem on top",
    "a striped animal with four legs, long tail and pointed ears standing on grass",
    "USER: ASSISTANT: the quick brown fox jumps over the lazy dog 0123456789",
]

TINY_TEXT_HIDDEN = 32
TINY_TEXT_LAYERS = 2
# A wider init than transformers' 0.02 makes the answers depend on the image; the EOS strength
# gives answers of mixed length at max_new_tokens=8 (measured: lengths 2..8 over 10 random images).
INIT_STD = 0.2
EOS_STRENGTH = 2.0


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_tiny_mllm(directory: str | Path, seed: int = 0, image_size: int = 16, patch_size: int = 8) -> Path:
    """Write a tiny LLaVA (CLIP vision tower + Llama decoder) with its processor into ``directory``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    directory = Path(directory)
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
        initializer_range=INIT_STD,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=INIT_STD,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        initializer_range=INIT_STD,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Point the end-of-sequence logit along a random direction, strong enough that greedy answers
        # end early for some images and run to max_new_tokens for others (both paths get exercised).
        direction = torch.randn(TINY_TEXT_HIDDEN, generator=torch.Generator().manual_seed(seed + 1))
        head = model.lm_head.weight
        head[tokenizer.eos_token_id] = direction / direction.norm() * EOS_STRENGTH * head.norm(dim=1).max()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


if __name__ == "__main__":
    import sys

    print(build_tiny_mllm(sys.argv[1] if len(sys.argv) > 1 else "tiny_mllm"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are far too small for threads; on shared cores threads only spin (~7x slower).

    Import it into a test module (``from tiny_mllm import one_thread``) to run that module on one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
