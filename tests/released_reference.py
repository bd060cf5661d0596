"""The released prompt learners' forward passes, restated on open_clip's own modules, for parity tests.

Each function says in a few lines what the authors' released code computes (KaiyangZhou/CoOp,
htyao89/KgCoOp, muzairkhattak/multimodal-prompt-learning, muzairkhattak/PromptSRC), written from
reading it, using only open_clip's modules of the model under test — never our prompt assembly.
The tiny CLIP below has random weights *and* random LayerNorm affines (fresh open_clip LayerNorms are
1/0, which would hide a prompt entering before instead of after ``ln_pre``).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

TINY_CLIP = "mugcp-tiny-test"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 3, "layers": 3},
}


def register_tiny_clip() -> str:
    """Make ``TINY_CLIP`` an open_clip model name (3 layers per tower, widths 48/64); idempotent."""
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="mugcp-tiny-clip-"))
        (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(folder)
    return TINY_CLIP


def randomise_frozen_clip(clip, seed: int = 0) -> None:
    """Non-identity affines in every LayerNorm and a non-default temperature, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in clip.model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
        clip.model.logit_scale.fill_(3.2)


def tiny_clip(seed: int = 0):
    from mugcp.backbones import load_clip

    clip = load_clip(register_tiny_clip(), pretrained=None)
    randomise_frozen_clip(clip, seed)
    return clip


def randomise_prompt_parameters(model, seed: int = 1, scale: float = 0.5) -> None:
    """Every trainable tensor of ``model`` replaced by random, non-zero values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(scale * torch.randn(param.shape, generator=generator))


# ----------------------------------------------------------------- released building blocks
def released_class_embeddings(model, tokenizer, prompt_prefix: str, n_ctx: int, classnames):
    """``prompts = [prompt_prefix + " " + name + "." ...]`` → (tokens, token_prefix (SOS), token_suffix)."""
    tokens = tokenizer([f"{prompt_prefix} {name}." for name in classnames])
    embedding = model.token_embedding(tokens)
    return tokens, embedding[:, :1], embedding[:, 1 + n_ctx :]


def released_text_encoder(model, prompts, tokens, deeper=()):
    """``TextEncoder`` with the IVLP/MaPLe blocks: ``deeper[i-1]`` replaces positions 1..1+n at layer i ≥ 1."""
    x = prompts + model.positional_embedding
    for index, block in enumerate(model.transformer.resblocks):
        if 1 <= index <= len(deeper):
            prompt = deeper[index - 1]
            x = torch.cat([x[:, :1], prompt.expand(x.shape[0], -1, -1), x[:, 1 + prompt.shape[0] :]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def released_image_encoder(model, images, first=None, deeper=()):
    """``VisionTransformer(_MaPLe)``: ``first`` concatenated after the positions are added and before
    ``ln_pre``; ``deeper[i-1]`` replaces the last n tokens at layer i ≥ 1; CLS through ``ln_post``."""
    visual = model.visual
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = x + visual.positional_embedding
    if first is not None:
        x = torch.cat([x, first.expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for index, block in enumerate(visual.transformer.resblocks):
        if 1 <= index <= len(deeper):
            prompt = deeper[index - 1]
            x = torch.cat([x[:, : x.shape[1] - prompt.shape[0]], prompt.expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def released_logits(model, image_features, text_features):
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image_features @ text_features.t()


def released_name_lengths(tokenizer, classnames):
    return [int(row.argmax()) - 1 for row in tokenizer(list(classnames))]


# ----------------------------------------------------------------- released methods
def released_coop_logits(model, tokenizer, images, classnames, ctx, prompt_prefix, position="end"):
    """CoOp ``PromptLearner.forward`` (class token at the end, middle or front) + ``CustomCLIP``."""
    n_ctx = ctx.shape[-2]
    tokens, prefix, suffix = released_class_embeddings(model, tokenizer, prompt_prefix, n_ctx, classnames)
    ctx = ctx.unsqueeze(0).expand(len(classnames), -1, -1) if ctx.dim() == 2 else ctx
    if position == "end":
        prompts = torch.cat([prefix, ctx, suffix], dim=1)
    else:
        rows, half = [], n_ctx // 2
        for i, name_len in enumerate(released_name_lengths(tokenizer, classnames)):
            name, rest = suffix[i : i + 1, :name_len], suffix[i : i + 1, name_len:]
            if position == "middle":
                rows.append(torch.cat([prefix[i : i + 1], ctx[i : i + 1, :half], name, ctx[i : i + 1, half:], rest],
                                      dim=1))
            else:
                rows.append(torch.cat([prefix[i : i + 1], name, ctx[i : i + 1], rest], dim=1))
        prompts = torch.cat(rows)
    return released_logits(model, released_image_encoder(model, images), released_text_encoder(model, prompts, tokens))


def released_cocoop_logits(model, tokenizer, images, classnames, ctx, linear1, linear2, prompt_prefix):
    """CoCoOp: ``meta_net`` (linear1–ReLU–linear2) on the normalised image feature shifts every context vector."""
    tokens, prefix, suffix = released_class_embeddings(model, tokenizer, prompt_prefix, ctx.shape[0], classnames)
    image_features = released_image_encoder(model, images)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    bias = F.linear(F.relu(F.linear(image_features, *linear1)), *linear2)
    rows = []
    for shifted, feature in zip(ctx.unsqueeze(0) + bias.unsqueeze(1), image_features):
        prompts = torch.cat([prefix, shifted.unsqueeze(0).expand(len(classnames), -1, -1), suffix], dim=1)
        text = released_text_encoder(model, prompts, tokens)
        text = text / text.norm(dim=-1, keepdim=True)
        rows.append(model.logit_scale.exp() * feature @ text.t())
    return torch.stack(rows)


def released_deep_logits(model, tokenizer, images, classnames, ctx, deeper_text, vision_first, deeper_vision,
                         prompt_prefix):
    """IVLP / PromptSRC / MaPLe ``CustomCLIP``: layer-0 text context in the class prompts, deeper text
    prompts after SOS, the first vision prompts before ``ln_pre``, deeper vision prompts at the end."""
    tokens, prefix, suffix = released_class_embeddings(model, tokenizer, prompt_prefix, ctx.shape[0], classnames)
    prompts = torch.cat([prefix, ctx.unsqueeze(0).expand(len(classnames), -1, -1), suffix], dim=1)
    text = released_text_encoder(model, prompts, tokens, deeper_text)
    image = released_image_encoder(model, images, vision_first, deeper_vision)
    return released_logits(model, image, text), image, text


def released_template_features(model, tokenizer, templates, classnames, normalize_each=True):
    """Frozen CLIP class features over templates: ZeroshotCLIP(2) normalise each template's features
    before averaging; PromptSRC averages the raw ones. Returned normalised."""
    features = []
    for template in templates:
        feature = model.encode_text(tokenizer([template.format(name) for name in classnames]))
        features.append(feature / feature.norm(dim=-1, keepdim=True) if normalize_each else feature)
    mean = torch.stack(features).mean(0)
    return mean / mean.norm(dim=-1, keepdim=True)


def released_prograd_init(model, tokenizer, template, n_ctx):
    """ProGrad ``PromptLearner`` with CTX_INIT: the template without " {}." gives W words; the context is
    ``n_ctx - W`` zero rows then the text's first W token embeddings; the class prefix is X × (n_ctx - W) + text."""
    text = template.replace(" {}.", "")
    words = len(text.split(" "))
    ctx = torch.zeros(n_ctx, model.token_embedding.weight.shape[1])
    ctx[n_ctx - words:] = model.token_embedding(tokenizer([text]))[0, 1 : 1 + words]
    return ctx, f"{' '.join(['X'] * (n_ctx - words))} {text}"


def released_prograd_losses(student_logits, teacher_logits, labels, temperature=1.0):
    """``ProGradLoss``: (cross-entropy, batch mean of −Σ softmax(teacher/T) · log_softmax(student/T) · T²)."""
    soft = F.softmax(teacher_logits / temperature, dim=-1)
    kl = (-soft * F.log_softmax(student_logits / temperature, -1) * temperature * temperature).sum(1).mean()
    return F.cross_entropy(student_logits, labels), kl


def released_tcp_text_features(model, tokenizer, classnames, ctx, linear1, linear2, prompt_template,
                               handcrafted_template, layer):
    """TCP ``PromptLearner`` + ``TextEncoder``: tokens 1..4 of the learnable template are ``ctx``; the hand-crafted
    features go through linear1–QuickGELU–linear2 into 4 tokens per class that replace positions 1..4 of the input of
    block ``layer``. Returns (normalised learned features, normalised hand-crafted features)."""
    handcrafted = released_template_features(model, tokenizer, [handcrafted_template], classnames)
    hidden = F.linear(handcrafted, *linear1)
    class_feature = F.linear(hidden * torch.sigmoid(1.702 * hidden), *linear2)
    class_feature = class_feature.reshape(len(classnames), -1, ctx.shape[1])
    tokens = tokenizer([prompt_template.format(name) for name in classnames])
    embedding = model.token_embedding(tokens)
    x = torch.cat([embedding[:, :1], ctx.expand(len(classnames), -1, -1), embedding[:, 1 + ctx.shape[0]:]], dim=1)
    x = x + model.positional_embedding
    for index, block in enumerate(model.transformer.resblocks):
        if index == layer:
            x = torch.cat([x[:, :1], class_feature, x[:, 1 + class_feature.shape[1]:]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    text = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return text / text.norm(dim=-1, keepdim=True), handcrafted
