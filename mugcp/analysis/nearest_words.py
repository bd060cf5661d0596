"""Nearest vocabulary words of learned context vectors, as CoOp's paper reports them.

For every learned text context vector (each prompted layer of a deep-prompt method, each class of
class-specific CoOp) the ``k`` vocabulary tokens whose token embeddings are closest in Euclidean
distance. Deeper layers' prompts live in the layer inputs rather than the embedding table; their
nearest words are reported the same way, as a description, not a decoding.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm


@dataclass
class ContextVectors:
    """Learned text tokens ``(n, d_t)``: parameter name, prompted layer and, for class-specific context, the class."""

    name: str
    layer: int
    vectors: torch.Tensor
    group: Optional[str] = None
    note: str = ""


def learned_text_contexts(model) -> list[ContextVectors]:
    """Every learned text-side context of a prompt learner (empty for zero-shot CLIP)."""
    found: list[ContextVectors] = []
    ctx = getattr(model, "ctx", None)
    if isinstance(ctx, nn.Parameter):
        note = "shared part; each image adds the meta-net's shift" if getattr(model, "conditional", False) else ""
        if ctx.dim() == 3:  # class-specific CoOp / KgCoOp: one context per class
            names = (model.classnames if len(model.classnames) == ctx.shape[0]
                     else [f"class {i}" for i in range(ctx.shape[0])])
            found += [ContextVectors("ctx", 0, ctx[i].detach(), group=names[i]) for i in range(ctx.shape[0])]
        else:
            found.append(ContextVectors("ctx", 0, ctx.detach(), note=note))
    stack = getattr(model, "text_prompts", None)
    if stack is not None and hasattr(stack, "layers"):
        found += [ContextVectors(f"text_prompts.layers.{j}", j, p.detach()) for j, p in enumerate(stack.layers)]
    context = getattr(model, "text_context", None)
    if isinstance(context, nn.Parameter):
        found += [ContextVectors("text_context", j, context[j].detach()) for j in range(context.shape[0])]
    semantic = getattr(model, "semantic_tokens", None)
    if isinstance(semantic, nn.Parameter):
        found.append(ContextVectors("semantic_tokens", 0, semantic.detach(),
                                    note="learned stand-in for SCP (semantic_source=none)"))
    return found


def nearest_tokens(vectors: torch.Tensor, embeddings: torch.Tensor, k: int,
                   chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distances (n, k), token ids (n, k))``, closest first, by Euclidean distance, in float64, over vocabulary
    chunks."""
    vectors = vectors.detach().to("cpu", torch.float64)
    k = min(k, embeddings.shape[0])
    best_d = torch.full((vectors.shape[0], 0), float("inf"), dtype=torch.float64)
    best_i = torch.zeros((vectors.shape[0], 0), dtype=torch.long)
    for first in range(0, embeddings.shape[0], chunk):
        part = embeddings[first:first + chunk].detach().to("cpu", torch.float64)
        distances = torch.cdist(vectors, part, compute_mode="donot_use_mm_for_euclid_dist")
        best_d = torch.cat([best_d, distances], dim=1)
        best_i = torch.cat([best_i, torch.arange(first, first + part.shape[0]).expand(vectors.shape[0], -1)], dim=1)
        best_d, order = best_d.topk(min(k, best_d.shape[1]), dim=1, largest=False, sorted=True)
        best_i = best_i.gather(1, order)
    return best_d, best_i


def token_text(tokenizer, token_id: int) -> str:
    """The vocabulary entry of one token id, readable (open_clip's BPE: ``"photo</w>"`` → ``"photo"``)."""
    decoder = getattr(tokenizer, "decoder", None)
    if isinstance(decoder, dict) and token_id in decoder:
        text = decoder[token_id]
        byte_decoder = getattr(tokenizer, "byte_decoder", None)
        if byte_decoder:
            raw = text
            text = bytearray(byte_decoder.get(c, ord("?"))
                             for c in text.replace("</w>", "")).decode("utf-8", errors="replace")
            if "\ufffd" in text:  # a piece of a multi-byte character: its BPE spelling says more than "�"
                return raw
        else:
            text = text.replace("</w>", "")
        return text
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return str(tokenizer.convert_ids_to_tokens(int(token_id)))
    return f"<{token_id}>"


def nearest_words(model, k: int = 5, progress: bool = False) -> list[dict]:
    """One row per learned context vector: where it is, its norm, and its ``k`` nearest words with distances."""
    clip = model.clip
    embeddings = clip.model.token_embedding.weight
    rows = []
    contexts = learned_text_contexts(model)
    for context in tqdm(contexts, desc="nearest words", unit="layer", disable=not progress or len(contexts) < 2,
                        leave=False):
        distances, ids = nearest_tokens(context.vectors, embeddings, k)
        for position in range(context.vectors.shape[0]):
            rows.append({
                "parameter": context.name, "layer": context.layer, "class": context.group or "", "position": position,
                "norm": float(context.vectors[position].float().norm()), "note": context.note,
                "words": [token_text(clip.tokenizer, int(i)) for i in ids[position]],
                "token_ids": [int(i) for i in ids[position]],
                "distances": [float(d) for d in distances[position]],
            })
    return rows


def nearest_words_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["parameter", "layer", "class", "position", "rank", "word", "token_id", "distance", "vector_norm"])
    for row in rows:
        for rank, (word, token, distance) in enumerate(zip(row["words"], row["token_ids"], row["distances"]), 1):
            writer.writerow([row["parameter"], row["layer"], row["class"], row["position"], rank, word, token,
                             f"{distance:.6f}", f"{row['norm']:.6f}"])
    return buffer.getvalue()


def nearest_words_markdown(rows: Sequence[dict], method: str) -> str:
    if not rows:
        return f"# Nearest words\n\n{method} learns no text context vectors (nothing to show).\n"
    lines = ["# Nearest words of the learned context", "",
             f"Method {method}. For each learned context vector, the closest vocabulary tokens by Euclidean distance "
             "in the token-embedding space (distance in brackets), as in CoOp's paper. Prompts of layers 1 and up "
             "enter deeper layers' inputs, not the embedding table: their nearest words describe them, they do not "
             "decode them.", ""]
    notes = sorted({r["note"] for r in rows if r["note"]})
    lines += [f"Note: {n}." for n in notes] + ([""] if notes else [])
    with_class = any(r["class"] for r in rows)
    header = ["parameter", "layer", *(["class"] if with_class else []), "position", "norm", "nearest words"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        words = ", ".join(f"{_escape(w)} ({d:.3f})" for w, d in zip(row["words"], row["distances"]))
        cells = [row["parameter"], str(row["layer"]), *([_escape(row["class"])] if with_class else []),
                 str(row["position"]), f"{row['norm']:.3f}", words]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
