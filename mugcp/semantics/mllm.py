"""A Hugging Face image-text-to-text model that answers one prompt per image: text + answer hidden states.

Works with any model that ``AutoProcessor`` + ``AutoModelForImageTextToText`` load and whose
processor has a chat template (LLaVA-1.5/NeXT, Qwen2-VL/2.5-VL, SmolVLM, ...). Generation is
greedy and batched with left padding, so every prompt ends at the same position.

Which hidden states are kept: ``generate(output_hidden_states=True)`` returns one tuple per
step; step t holds every layer's states at the position whose next-token prediction *is*
answer token t (the last prompt position at t = 0, answer token t-1 after). Row t of an
answer's (T, d_m) matrix is the chosen layer's state at that position, for t up to and
including the first end-of-sequence token, so T >= 1 and rows and answer tokens pair up.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mugcp.errors import UserError

DEFAULT_PROMPT = (
    "Describe the salient visual attributes of the main object in this image: its colour, shape, "
    "texture, parts and material. Answer in one sentence."
)


class MLLMError(UserError, RuntimeError):
    """The MLLM cannot be loaded or used as asked; the message names the model and the fix."""


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    message = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model_name(name: str) -> str:
    """A local directory as an absolute path (so reruns compare equal), a hub id unchanged."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if looks_like_path(name):
        raise MLLMError(
            f"--mllm {name}: no such directory. Offline loading needs a local directory holding the "
            "model's config, weights and processor files (e.g. written by save_pretrained or "
            "`hf download MODEL_ID --local-dir DIR`)."
        )
    return name


_FOLDER_HINT = (
    "--mllm takes a Hugging Face image-text-to-text model (AutoProcessor + AutoModelForImageTextToText). "
    "Offline loading needs a local directory holding the model's config, weights and processor files "
    "(e.g. written by save_pretrained or `hf download MODEL_ID --local-dir DIR`)."
)


def missing_model_files(folder: Path) -> list[str]:
    """What a model folder lacks of config, weights and processor files ([] when nothing is missing)."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("weights (*.safetensors or *.bin)")
    processor_files = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json")
    if not any((folder / file).is_file() for file in processor_files):
        missing.append("processor files (" + ", ".join(processor_files) + ")")
    return missing


def _load_failure(name: str, what: str, err: BaseException) -> MLLMError:
    """The error first (its type and first line), then a hint only where the hint is what is wrong:
    a local folder that lacks model files, or a hub id that is not in the local cache."""
    first_line = (str(err).strip().splitlines() or [""])[0]
    message = f"could not load the MLLM {name!r} ({what}): {type(err).__name__}: {first_line}"
    folder = Path(name).expanduser()
    if folder.is_dir():
        missing = missing_model_files(folder)
        if missing:
            message += f"\n{folder} lacks {'; '.join(missing)}. {_FOLDER_HINT}"
    elif isinstance(err, OSError):
        message += f"\n{_FOLDER_HINT}"
    return MLLMError(message)


def _from_pretrained(loader, name: str, what: str, **kwargs):
    """Try the local files first (fast and offline), then the Hub when it may be reached."""
    if Path(name).is_dir():
        try:
            return loader.from_pretrained(name, **kwargs)
        except Exception as err:
            raise _load_failure(name, what, err) from err
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except Exception as local_err:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise _load_failure(name, what, local_err) from local_err
    try:
        return loader.from_pretrained(name, **kwargs)
    except Exception as err:
        raise _load_failure(name, what, err) from err


def load_text_config(name: str, revision: str | None = None):
    """The language model's config (for d_m and the layer count) without loading any weights."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, name, "config", revision=revision)
    return config, config.get_text_config()


def num_hidden_states(text_config) -> int:
    """Length of each step's hidden-state tuple: the embeddings plus one entry per layer."""
    return int(text_config.num_hidden_layers) + 1


def resolve_layer(layer: int, text_config, name: str) -> int:
    count = num_hidden_states(text_config)
    if not -count <= layer < count:
        raise MLLMError(
            f"--layer {layer} is out of range for {name}: its language model has {count - 1} layers, so "
            f"--layer takes -{count}..{count - 1} (0 = the token embeddings, -1 = the last layer)."
        )
    return layer % count


def answer_hidden_states(
    step_hidden: Sequence[Sequence[torch.Tensor]],
    generated: torch.Tensor,
    eos_token_ids: Sequence[int],
    layer: int,
) -> tuple[list[torch.Tensor], list[int]]:
    """Per answer: the chosen layer's states (T_b, d_m) for its tokens up to the first EOS.

    step_hidden: generate's ``hidden_states`` (one tuple per step, each tuple one (B, L, d_m)
    tensor per layer, L = prompt length at step 0 and 1 after); generated: (B, S) the new
    tokens only. Answers that end early are followed by padding, which is cut off here.
    Returns the per-answer states and their lengths T_b.
    """
    steps = len(step_hidden)
    if steps != generated.shape[1]:
        raise MLLMError(f"generate returned {steps} hidden-state steps for {generated.shape[1]} new tokens.")
    states = torch.stack([step[layer][:, -1, :] for step in step_hidden], dim=1)  # (B, S, d_m)
    is_eos = torch.isin(generated, torch.as_tensor(list(eos_token_ids), device=generated.device))
    # Index of the first EOS per row, or S when the answer ran to max_new_tokens.
    positions = torch.arange(steps, device=generated.device).expand_as(generated)
    first_eos = torch.where(is_eos, positions, torch.full_like(positions, steps)).min(dim=1).values
    lengths = torch.clamp(first_eos + 1, max=steps).tolist()
    return [states[b, :length] for b, length in enumerate(lengths)], lengths


@dataclass
class Answer:
    text: str
    hidden: torch.Tensor  # (T, d_m) on the CPU, in the model's dtype


class MLLM:
    """Loads the processor and model once; ``describe(images)`` answers the prompt for each image."""

    def __init__(
        self,
        name: str,
        prompt: str = DEFAULT_PROMPT,
        layer: int = -1,
        max_new_tokens: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        revision: str | None = None,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if max_new_tokens < 1:
            raise MLLMError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
        self.name = name
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.processor = _from_pretrained(AutoProcessor, name, "processor", revision=revision)
        self.model = _from_pretrained(AutoModelForImageTextToText, name, "model", revision=revision, dtype=dtype)
        self.model.to(self.device).eval()
        text_config = self.model.config.get_text_config()
        self.layer = resolve_layer(layer, text_config, name)
        self.hidden_dim = int(text_config.hidden_size)
        self.revision = getattr(self.model.config, "_commit_hash", None)

        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise MLLMError(f"the processor of {name} has no tokenizer; extraction needs one to decode answers.")
        if getattr(self.processor, "chat_template", None) is None:
            raise MLLMError(
                f"the processor of {name} has no chat template, so there is no way to know where the image "
                "and the prompt go; use the model's instruction-tuned (chat) variant."
            )
        # Decoder-only generation appends after the last position: pad on the left.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            raise MLLMError(f"{name} defines no end-of-sequence token (generation_config.eos_token_id).")
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)

    def _inputs(self, images: Sequence) -> dict:
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": self.prompt}]}]
            for image in images
        ]
        inputs = self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        )
        moved = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, self.model.dtype) if value.is_floating_point() else value.to(self.device)
            moved[key] = value
        return moved

    @torch.inference_mode()
    def describe(self, images: Sequence) -> list[Answer]:
        """Greedy answers for a batch of PIL images."""
        inputs = self._inputs(images)
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            output_hidden_states=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        generated = output.sequences[:, inputs["input_ids"].shape[1]:]
        step_hidden = output.hidden_states if output.get("hidden_states") is not None else output.decoder_hidden_states
        states, lengths = answer_hidden_states(step_hidden, generated, self.eos_token_ids, self.layer)
        texts = self.tokenizer.batch_decode(
            [tokens[:length] for tokens, length in zip(generated, lengths)], skip_special_tokens=True
        )
        return [Answer(text.strip(), state.to("cpu")) for text, state in zip(texts, states)]
