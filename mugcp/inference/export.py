"""A trained run as one ONNX graph: preprocessed images ``(N, 3, S, S)`` in, logits over a fixed class list out.

DESIGN §7. Methods whose text features do not depend on the image bake the normalised class features
times the logit scale in as a constant (:class:`BakedClassifier`: the prompted image encoder and one
matmul); per-image methods (CoCoOp, MuGCP) export their whole conditional path
(:class:`ConditionalClassifier`). The graph is traced by ``torch.export`` (``torch.onnx.export(...,
dynamo=True)``), which keeps the batch dimension symbolic; TorchScript tracing would bake the example's
batch size into the per-image text path's reshapes. Exports build the model with the reference kernels,
``sdpa`` attention and the unbucketed text path (bucketing groups classes by their token ids, which a
traced graph cannot read); all three compute the same logits as the trained configuration.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugcp.config import ConfigError
from mugcp.inference.onnx_runner import ExportMetadata
from mugcp.runs.checkpoint import find_checkpoint
from mugcp.runs.layout import ADAPTER_CONFIG_FILE
from mugcp.utils import atomic_write

EXPORT_DTYPES = ("fp32", "fp16")
#: MuGCP semantic sources an ONNX graph can compute from the image alone
EXPORTABLE_SEMANTIC_SOURCES = ("clip", "none")
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportError(ConfigError):
    """A run that cannot be exported, said before anything is loaded."""


def check_exportable(run: str | Path) -> dict:
    """The run's ``adapter_config.json`` when it names a known method whose inputs are images alone."""
    from mugcp.methods.registry import list_methods

    checkpoint = find_checkpoint(run)
    try:
        config = json.loads((checkpoint / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        method, options = config["method"], dict(config.get("method_options") or {})
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ExportError(
            f"{checkpoint / ADAPTER_CONFIG_FILE}: not written by mugcp ({type(err).__name__}: {err})."
        ) from None
    known = list_methods()
    if method not in known:
        raise ExportError(
            f"{run}: method {method!r} is unknown to this mugcp (known: {', '.join(known)}); "
            "export it with the mugcp version that trained it."
        )
    source = options.get("semantic_source")
    if method == "mugcp" and source not in EXPORTABLE_SEMANTIC_SOURCES:
        raise ExportError(
            f"{run}: MuGCP with semantic_source={source!r} needs each new image's MLLM answer at inference, "
            "which an ONNX graph of CLIP cannot compute; export runs trained with semantic.source=clip or none."
        )
    return config


def load_for_export(run: str | Path, classnames: Optional[Sequence[str]] = None):
    """``(learner, trained run, image size)``: the run's model on the CPU, built the way exports trace it."""
    from mugcp.runs.run_setup import SemanticContext, build_run_model
    from mugcp.runs.trained_run import read_trained_run

    trained = read_trained_run(run)
    cfg = trained.cfg
    cfg["model"].update(attention="sdpa", kernels="reference", text_bucketing=False)
    names = trained.resolve_classnames(classnames)
    learner = build_run_model(cfg, names, torch.device("cpu"), SemanticContext(), dataset_name=cfg["data"]["dataset"])
    learner.load_adapter_state(trained.tensors, source=str(trained.checkpoint))
    if "max_text_sequences" in learner.options:
        learner.options["max_text_sequences"] = 0  # one text pass per batch: splitting it would fix the batch size
    learner.eval()
    return learner, trained, int(cfg["data"]["image_size"] or learner.clip.image_size)


class BakedClassifier(nn.Module):
    """The (prompted) image encoder and one matmul with constant class weights (normalised text features ×
    logit scale, ``(E, C)``): what a method whose text features do not depend on the image deploys as."""

    def __init__(self, learner):
        super().__init__()
        self.learner = learner
        with torch.no_grad():
            weights = F.normalize(learner.text_features().float(), dim=-1) * learner.clip.logit_scale.exp().float()
        self.register_buffer("class_weights", weights.t().contiguous())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encode = getattr(self.learner, "encode_images", self.learner.clip.encode_image)
        features = encode(images).float()
        logits = F.normalize(features, dim=-1) @ self.class_weights
        return self.learner.fused_logits(features, logits)  # a DePT head's share, as evaluation adds it


class ConditionalClassifier(nn.Module):
    """A per-image method's whole forward (its text features depend on each image) for a fixed class list."""

    def __init__(self, learner):
        super().__init__()
        self.learner = learner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.learner(images).float()


def deployed_module(learner) -> nn.Module:
    return (ConditionalClassifier(learner) if learner.conditional else BakedClassifier(learner)).eval()


def export_metadata(learner, trained, image_size: int, dtype: str) -> ExportMetadata:
    from mugcp.data.transforms import OPENAI_MEAN, OPENAI_STD

    model_cfg = trained.cfg["model"]
    return ExportMetadata(
        classnames=list(learner.classnames),
        method=learner.variant_name,  # coop+dept for a DePT run: what reports call it
        backbone=str(model_cfg["backbone"]),
        pretrained=str(model_cfg["pretrained"]),
        image_size=image_size,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        interpolation="bicubic",
        dtype=dtype,
        run=str(trained.checkpoint.parent),
    )


def onnx_model(module: nn.Module, image_size: int, dtype: str = "fp32"):
    """The ``onnx.ModelProto`` of ``module`` with a dynamic batch; fp16 keeps fp32 images in and logits out."""
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    model = program.model_proto
    if dtype == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
    return model


def write_onnx(model, metadata: ExportMetadata, out: str | Path) -> Path:
    """Write ``model`` with ``metadata`` as its ``metadata_props``, atomically."""
    import onnx

    onnx.helper.set_model_props(model, metadata.to_props())
    out = Path(out)
    atomic_write(out, lambda tmp: onnx.save(model, tmp))
    return out


def largest_logit_difference(
    learner, onnx_path: str | Path, image_size: int, images: int = 4, seed: int = 0
) -> tuple[float, float]:
    """(largest |onnxruntime − PyTorch| logit, largest |PyTorch logit|) on ``images`` random inputs."""
    from mugcp.inference.onnx_runner import OnnxClassifier

    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(images, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        expected = learner(batch).float().numpy()
    got = OnnxClassifier(onnx_path).logits(batch.numpy())
    return float(abs(got - expected).max()), float(abs(expected).max())


def export_run(run: str | Path, out: str | Path, classnames: Optional[Sequence[str]] = None, dtype: str = "fp32"):
    """Export ``run`` to ``out``; returns ``(learner, metadata)`` (the learner for ``--check``)."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}.")
    check_exportable(run)
    learner, trained, image_size = load_for_export(run, classnames)
    metadata = export_metadata(learner, trained, image_size, dtype)
    write_onnx(onnx_model(deployed_module(learner), image_size, dtype), metadata, out)
    return learner, metadata
