"""Tokenised class prompts with learnable-context slots, shared by every text-prompting method."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugcp.backbones import ClipBackbone
from mugcp.config import ConfigError

# CLIP's text context is 77 tokens: SOS, the context, at least one class-name token, "." and EOT must fit.
MAX_TEXT_CONTEXT = 77 - 4


def context_words(init: str) -> int:
    """How many context tokens CoOp's released code makes of ``ctx_init``: its words, ``_`` counting as a space."""
    return len(init.replace("_", " ").split(" "))


def check_context_words(options: dict) -> None:
    """CoOp, CoCoOp and KgCoOp: ``n_ctx`` must equal ``ctx_init``'s word count when ``ctx_init`` is set.

    The released code then takes the context length from the words and ignores ``n_ctx``; a run that
    recorded another ``n_ctx`` than it trained would mislabel a sweep, so the disagreement is refused.
    """
    init, n_ctx = options["ctx_init"], options["n_ctx"]
    if init and context_words(init) != n_ctx:
        words = context_words(init)
        raise ConfigError(
            f"method.n_ctx={n_ctx} disagrees with method.ctx_init={init!r} ({words} words): the context length is "
            f"ctx_init's word count, as in the released code. Set method.n_ctx={words}, or method.ctx_init='' "
            f"for {n_ctx} random context tokens."
        )


def init_context(clip: ClipBackbone, n_ctx: int, init: str = "", std: float = 0.02,
                 rows: int = 1) -> tuple[torch.Tensor, str]:
    """CoOp's context initialisation, as its released code does it: ``(vectors (rows, n, width), prompt prefix)``.

    With ``init`` text (``"a photo of a"``) the context count becomes the number of *words* of the text
    and the vectors are the text's first that many token embeddings; the class texts are then
    ``"{init} {class}."``, so when a word splits into several tokens the tokens beyond the context stay
    in every class text as fixed tokens (the released CoOp / CoCoOp / KgCoOp behaviour; for
    one-token words, as in "a photo of a", nothing is left over). Without ``init``: ``n_ctx`` Gaussian
    vectors with ``std`` and the prefix ``"X X ... X"``.
    """
    if init:
        prefix = init.replace("_", " ")
        count = context_words(init)
        ids = clip.tokenize([prefix])[0]
        with torch.no_grad():
            vectors = clip.embed_tokens(ids[None])[0, 1 : 1 + count].float()
        return vectors.unsqueeze(0).repeat(rows, 1, 1).clone(), prefix
    return torch.randn(rows, n_ctx, clip.text_width) * std, placeholder_prefix(n_ctx)


def placeholder_prefix(n_ctx: int, placeholder: str = "X") -> str:
    """``"X X ... X"``: one single-token placeholder word per context slot."""
    return " ".join([placeholder] * n_ctx)


class ClassPrompts(nn.Module):
    """``"{prefix} {class name}."`` for every class, as token ids and frozen embeddings, with the
    first ``n_ctx`` tokens after SOS as context slots: ``[SOS, ctx × n_ctx, rest of prefix, class name, '.', EOT]``.

    ``prefix`` defaults to ``n_ctx`` placeholder words (``"X X X X"``). The released prompt learners
    pass their initialisation text instead (``"a photo of a"``): its tokens beyond ``n_ctx`` stay as
    fixed words of every class text (MaPLe with ``n_ctx=2`` reads ``[SOS, ctx, ctx, "of", "a", class, ".", EOT]``).
    ``position`` puts the class name at the ``end`` (default), ``middle`` or ``front`` of the context.
    ``assemble(ctx)`` writes context vectors into the slots and returns embeddings ready for
    ``ClipBackbone.encode_text(self.tokens, embeddings=...)``.
    """

    def __init__(self, clip: ClipBackbone, classnames: Sequence[str], n_ctx: int, position: str = "end",
                 prefix: Optional[str] = None):
        super().__init__()
        if position not in ("end", "middle", "front"):
            raise ConfigError(f"class token position must be end, middle or front, got '{position}'")
        self.n_ctx = n_ctx
        self.position = position
        prefix = placeholder_prefix(n_ctx) if prefix is None else prefix
        prefix_tokens = int(clip.tokenize([prefix])[0].argmax()) - 1 if prefix else 0
        if prefix_tokens < n_ctx:
            raise ConfigError(f"the prompt prefix '{prefix}' has {prefix_tokens} tokens, fewer than the {n_ctx} "
                              "context slots it must hold.")
        if position != "end" and prefix_tokens != n_ctx:
            raise ConfigError(
                f"class token position '{position}' needs exactly n_ctx={n_ctx} context tokens before the class name, "
                f"but the prompt prefix '{prefix}' has {prefix_tokens} tokens; use class_token_position=end or a "
                "prefix of one-token words."
            )
        self.prefix_text = prefix
        names = [name.replace("_", " ") for name in classnames]
        texts = [f"{prefix} {name}." if prefix else f"{name}." for name in names]
        tokens = clip.tokenize(texts)
        name_tokens = clip.tokenize(names)
        self.name_lengths = [int(row.argmax()) - 1 for row in name_tokens]
        with torch.no_grad():
            embedding = clip.embed_tokens(tokens)
        # Buffers, not parameters, and not persistent: a checkpoint must not carry class names.
        # The sequences' useful length as a number, so that exporting (torch.export) need not read the token ids.
        self.length = int(tokens.argmax(dim=-1).max()) + 1
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedding[:, :1], persistent=False)
        self.register_buffer("suffix", embedding[:, 1 + n_ctx :], persistent=False)

    @property
    def shared_prefix(self) -> int:
        """Leading positions that are the same for every class with a shared context: ``[SOS, ctx]`` when
        the class name is at the end, else ``[SOS]`` (see ``ClipBackbone.encode_text``)."""
        return 1 + self.n_ctx if self.position == "end" else 1

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """Embeddings for context ``ctx``.

        ``ctx`` is ``(n_ctx, D)`` (shared), ``(C, n_ctx, D)`` (class-specific) or ``(B, n_ctx, D)`` with
        ``per_image`` semantics when its first dim differs from C — see ``assemble_per_image``.
        Returns ``(C, L, D)``.
        """
        classes = self.prefix.shape[0]
        ctx = ctx.to(self.prefix.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(classes, -1, -1)
        if self.position == "end":
            return torch.cat([self.prefix, ctx, self.suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for c, name_len in enumerate(self.name_lengths):
            name, rest = self.suffix[c : c + 1, :name_len], self.suffix[c : c + 1, name_len:]
            ctx_c = ctx[c : c + 1]
            if self.position == "middle":
                parts = [self.prefix[c : c + 1], ctx_c[:, :half], name, ctx_c[:, half:], rest]
            else:
                parts = [self.prefix[c : c + 1], name, ctx_c, rest]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)

    def assemble_per_image(self, ctx: torch.Tensor, rows: Optional[torch.Tensor] = None,
                           length: Optional[int] = None) -> torch.Tensor:
        """Per-image context ``(B, n_ctx, D)`` → embeddings ``(B·C', L', D)``, ordered ``[b·C' + c]``:
        every class (``C' = C``) at the full length by default, or the classes ``rows`` cut to ``length``."""
        prefix, suffix = self.prefix, self.suffix
        if rows is not None:
            prefix, suffix = prefix[rows], suffix[rows]
        batch, classes = ctx.shape[0], prefix.shape[0]
        length = self.tokens.shape[1] if length is None else length
        width = prefix.shape[-1]
        out = torch.empty(batch, classes, length, width, dtype=prefix.dtype, device=ctx.device)
        out[:, :, :1] = prefix
        out[:, :, 1 + self.n_ctx :] = suffix[:, : length - 1 - self.n_ctx]
        out[:, :, 1 : 1 + self.n_ctx] = ctx.to(out.dtype).unsqueeze(1)
        return out.view(batch * classes, length, width)


def template_text_features(clip: ClipBackbone, templates: Sequence[str], classnames: Sequence[str],
                           normalize_each: bool = True) -> torch.Tensor:
    """Frozen, normalised class features ``(C, E)`` averaged over ``templates`` (``"a photo of a {}."``...).

    ``normalize_each`` normalises every template's features before averaging (CLIP's ensembling);
    without it the raw features are averaged, as PromptSRC's released code does.
    """
    per_template = [encode_class_texts(clip, [template.format(name) for name in classnames]) for template in templates]
    if normalize_each:
        per_template = [F.normalize(features, dim=-1) for features in per_template]
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def encode_class_texts(clip: ClipBackbone, texts: Sequence[str], chunk: int = 256) -> torch.Tensor:
    """Frozen CLIP text features for plain strings, in chunks to bound memory."""
    features = []
    with torch.no_grad():
        for start in range(0, len(texts), chunk):
            features.append(clip.encode_text(clip.tokenize(texts[start : start + chunk])))
    return torch.cat(features)
