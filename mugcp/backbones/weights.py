"""Where CLIP weights come from: open_clip tags, local files, Hugging Face CLIP folders, or nowhere.

Every failure names the source, the model and the fix. ``pretrained="auto"`` is the one mode that may
fall back to random weights, and it says so loudly; every other source either loads or raises.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import zipfile
from pathlib import Path
from typing import Optional

import torch

from mugcp.errors import UserError

log = logging.getLogger(__name__)


RANDOM_WEIGHTS_SEED = 0


class PretrainedLoadError(UserError, RuntimeError):
    pass


def normalize_model_name(name: str) -> str:
    """OpenAI spells models 'ViT-B/16'; open_clip spells them 'ViT-B-16'."""
    return name.strip().replace("/", "-")


def model_name_problem(name: str) -> Optional[str]:
    """None when open_clip has a model config for ``name`` (either spelling), else what is wrong and close matches."""
    import difflib

    import open_clip

    name = normalize_model_name(name)
    known = open_clip.list_models()
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return f"unknown open_clip model '{name}'.{hint} See open_clip.list_models(); 'ViT-B/16' and 'ViT-B-16' both work."


def pretrained_problem(name: str, pretrained: Optional[str]) -> Optional[str]:
    """What is wrong with ``pretrained`` for model ``name``, found without loading anything; None when it can be
    tried."""
    source = None if pretrained in (None, "", "none", "None", False) else str(pretrained)
    if source is None or source == "auto":
        return None
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        if not (path / "config.json").is_file():
            return (f"pretrained folder {path} has no config.json; pass a Hugging Face CLIP folder, a weights file, "
                    "or an open_clip tag.")
        return None
    if path.is_file():
        return None
    if any(sep in source for sep in ("/", "\\")) or source.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return f"pretrained weights file or folder not found: {source} (model '{name}'). Check the path."
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    name = normalize_model_name(name)
    if not get_pretrained_cfg(name, source):
        tags = list_pretrained_tags_by_model(name)
        return (f"'{source}' is not an open_clip pretrained tag for model '{name}'. "
                f"Known tags: {', '.join(tags) or 'none'}.")
    return None


# ------------------------------------------------------------------ network / cache probing
def network_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when ``host`` resolves and accepts a connection within ``timeout`` seconds.

    Name lookups ignore socket timeouts and retry for ~50 s on a closed network, so the probe runs in
    a daemon thread and is abandoned after ``timeout``.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result["ok"]


def cached_pretrained_file(model_name: str, tag: str) -> Optional[str]:
    """The local file open_clip would load for (model, tag), if it is already cached; no network."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg:
        return None
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, filename = os.path.split(cfg["hf_hub"])
            for candidate in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
                found = try_to_load_from_cache(repo, candidate)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    if cfg.get("url"):
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if local.is_file():
            return str(local)
    return None


# ------------------------------------------------------------------ state dict readers
def _read_state_dict(path: Path) -> tuple[dict, str]:
    """Read a weights file; returns (state dict, format description)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), "safetensors state dict"
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        # OpenAI's released .pt files are TorchScript archives, which torch.load refuses.
        if not zipfile.is_zipfile(path):
            raise
        archive = torch.jit.load(str(path), map_location="cpu")
        state = archive.state_dict()
        for extra in ("input_resolution", "context_length", "vocab_size"):
            state.pop(extra, None)
        return state, "OpenAI TorchScript archive"
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedLoadError(f"{path}: expected a state dict, found {type(state).__name__}.")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state, "PyTorch state dict"


def _hf_clip_to_open_clip(state: dict, config: dict) -> dict:
    """Rename a Hugging Face CLIPModel state dict to open_clip's CLIP layout."""
    out: dict = {}

    def tower(prefix_hf: str, prefix_oc: str, layers: int):
        for i in range(layers):
            src = f"{prefix_hf}.encoder.layers.{i}."
            dst = f"{prefix_oc}resblocks.{i}."
            for kind in ("weight", "bias"):
                out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                    [state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
                )
                out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
                out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
                out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
                out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
                out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]

    text_layers = config["text_config"]["num_hidden_layers"]
    vision_layers = config["vision_config"]["num_hidden_layers"]
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    tower("text_model", "transformer.", text_layers)
    out["ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out["text_projection"] = state["text_projection.weight"].t().contiguous()
    out["visual.class_embedding"] = state["vision_model.embeddings.class_embedding"]
    out["visual.conv1.weight"] = state["vision_model.embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = state["vision_model.embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = state[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = state[f"vision_model.post_layernorm.{kind}"]
    tower("vision_model", "visual.transformer.", vision_layers)
    out["visual.proj"] = state["visual_projection.weight"].t().contiguous()
    out["logit_scale"] = state["logit_scale"]
    return out


def _read_hf_clip_dir(path: Path) -> tuple[dict, bool]:
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "clip":
        raise PretrainedLoadError(
            f"{path}/config.json has model_type '{config.get('model_type')}', expected 'clip' "
            "(a Hugging Face CLIPModel folder)."
        )
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(str(path / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise PretrainedLoadError(f"{path} holds no model.safetensors or pytorch_model.bin.")
    try:
        converted = _hf_clip_to_open_clip(state, config)
    except KeyError as err:
        raise PretrainedLoadError(f"{path}: Hugging Face CLIP weights lack {err}; "
                                  "is this a CLIPModel checkpoint?") from None
    quick_gelu = config.get("text_config", {}).get("hidden_act", "quick_gelu") == "quick_gelu"
    return converted, quick_gelu


def _check_and_load(model: torch.nn.Module, state: dict, source: str, name: str) -> None:
    own = model.state_dict()
    # open_clip registers the causal mask as a non-persistent buffer; OpenAI files carry it.
    state = {k: v for k, v in state.items() if k in own or not k.endswith("attn_mask")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_errors = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in own
        if key in state and tuple(state[key].shape) != tuple(own[key].shape)
    ]
    if missing or unexpected or shape_errors:
        details = []
        if shape_errors:
            details.append("shape mismatches: " + "; ".join(shape_errors[:3]))
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise PretrainedLoadError(
            f"weights from {source} do not fit model '{name}': {'; '.join(details)}. "
            f"Pick the model name these weights were trained with (model.backbone), or other weights."
        )
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------ activation
def choose_quick_gelu(name: str, setting: Optional[bool], evidence: Optional[bool], source: str) -> bool:
    """QuickGELU or GELU for model ``name`` loaded from ``source``, logged with the reason.

    ``setting`` is ``model.quick_gelu`` (``None`` = auto). Auto takes QuickGELU when the model name
    says so (``-quickgelu`` configs) or the weights do (``evidence``: an OpenAI TorchScript archive, an
    open_clip tag trained with it, a Hugging Face config with ``hidden_act: quick_gelu``). A plain
    state dict says nothing: auto then keeps the model's own activation and warns, because OpenAI's
    weights saved that way need ``model.quick_gelu=true``.
    """
    import open_clip

    built_in = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if setting is False and built_in:
        raise PretrainedLoadError(
            f"model.quick_gelu=false, but model '{name}' is defined with QuickGELU; use the name without "
            f"'-quickgelu' for GELU, or model.quick_gelu=auto."
        )
    if setting is not None:
        use, reason = setting, f"model.quick_gelu={'true' if setting else 'false'}"
    elif built_in:
        use, reason = True, f"the model config '{name}' uses it"
    elif evidence is not None:
        use, reason = evidence, f"the weights ({source}) were trained with {'QuickGELU' if evidence else 'GELU'}"
    else:
        use, reason = False, "model default"
        if source.startswith("PyTorch state dict") or source.startswith("safetensors state dict"):
            log.warning(
                "model.quick_gelu=auto: %s does not say which activation its model was trained with; using GELU. "
                "OpenAI's CLIP weights (e.g. clip.load(..., jit=False).state_dict()) need model.quick_gelu=true.",
                source,
            )
    log.info("%s uses %s (%s)", name, "QuickGELU" if use else "GELU", reason)
    return use


# ------------------------------------------------------------------ entry point
class _OpenClipNoWeightsNote(logging.Filter):
    """open_clip's "No pretrained weights loaded ... initialized randomly": we either load the weights
    ourselves right after (a file, a folder) or say that they are random in our own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


def _create_unloaded(name: str, quick_gelu: bool):
    """An open_clip model without weights, without open_clip's warning about it (see _OpenClipNoWeightsNote)."""
    import open_clip

    root, note = logging.getLogger(), _OpenClipNoWeightsNote()
    root.addFilter(note)  # open_clip warns through the root logger
    try:
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        root.removeFilter(note)


def build_open_clip_model(name: str, pretrained: Optional[str], quick_gelu: Optional[bool] = None):
    """Returns (open_clip model, description of the weights actually loaded or None for random).

    ``quick_gelu``: ``None`` (auto, see ``choose_quick_gelu``), ``True`` or ``False``.
    """
    import open_clip

    name = normalize_model_name(name)
    problem = model_name_problem(name)
    if problem:
        raise PretrainedLoadError(problem)

    source = None if pretrained in (None, "", "none", "None", False) else str(pretrained)
    if source is None:
        # Random weights are drawn from a fixed seed, so a checkpoint trained on them evaluates on the same ones.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            use = choose_quick_gelu(name, quick_gelu, None, "random weights")
            return _create_unloaded(name, use), None

    problem = pretrained_problem(name, source)
    if problem:
        raise PretrainedLoadError(problem)
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        state, hf_quick_gelu = _read_hf_clip_dir(path)
        use = choose_quick_gelu(name, quick_gelu, hf_quick_gelu, f"Hugging Face CLIP folder {path}")
        model = _create_unloaded(name, use)
        _check_and_load(model, state, f"Hugging Face CLIP folder {path}", name)
        return model, f"hf:{path}"
    if path.is_file():
        try:
            state, kind = _read_state_dict(path)
        except PretrainedLoadError:
            raise
        except Exception as err:  # unreadable / corrupt file
            raise PretrainedLoadError(f"cannot read weights file {path} for model '{name}': {err}") from None
        # OpenAI's models were trained with QuickGELU; their TorchScript archives are the telltale.
        archive = kind == "OpenAI TorchScript archive"
        use = choose_quick_gelu(name, quick_gelu, True if archive else None, f"{kind} {path}")
        model = _create_unloaded(name, use)
        _check_and_load(model, state, f"{kind} {path}", name)
        return model, f"file:{path}"
    tag = source
    cached = cached_pretrained_file(name, tag)
    if cached is None and not network_reachable():
        raise PretrainedLoadError(
            f"open_clip weights '{name}' / '{tag}' are not in the local cache and the network is unreachable. "
            f"Download them on a connected machine (open_clip.create_model('{name}', pretrained='{tag}')) and copy "
            "~/.cache/huggingface (or ~/.cache/clip), or pass a local file with model.pretrained=PATH, "
            "or use model.pretrained=none for random weights."
        )
    # open_clip itself only warns when a tag trained with QuickGELU (every 'openai' tag) meets a GELU config.
    from open_clip.pretrained import get_pretrained_cfg

    use = choose_quick_gelu(name, quick_gelu, bool(get_pretrained_cfg(name, tag).get("quick_gelu", False)),
                            f"open_clip tag '{tag}'")
    try:
        model = open_clip.create_model(name, pretrained=tag, force_quick_gelu=use)
    except Exception as err:
        raise PretrainedLoadError(f"loading open_clip weights '{name}' / '{tag}' failed: {err}") from None
    return model, f"open_clip:{tag}"
