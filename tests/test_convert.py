"""``python -m mugcp.convert``: released Dassl checkpoints → our checkpoint folders.

Files are built in the released layout from known tensors (names as the released prompt learners
register them, class-name buffers, frozen CLIP weights, an optimizer state and a scheduler object of
a class this machine cannot import). Every tensor must land in its place, the converted model must
give the logits of the released forward pass (``released_reference``), ``mugcp.evaluate`` must run
on the folder, and files of another method or no Dassl file at all are refused with the keys named.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures import make_imagefolder
from released_reference import (
    TINY_CLIP,
    register_tiny_clip,
    released_cocoop_logits,
    released_coop_logits,
    released_deep_logits,
    tiny_clip,
)

from mugcp.config import ConfigError
from mugcp.convert import main as convert_main
from mugcp.methods import create_model
from mugcp.runs.checkpoint import read_checkpoint

CLASSES = ["red fox", "blue whale", "snow owl"]
TEXT, VISION, EMBED = 48, 64, 32  # the tiny CLIP's widths
CALLS: list = []


def record_call(*args):  # what a malicious pickle would run on load; the converter must never call it
    CALLS.append(args)


class Payload:
    def __reduce__(self):
        return (record_call, ("pickle code ran",))


@pytest.fixture(scope="module")
def clip():
    register_tiny_clip()
    return tiny_clip()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def randn(*shape, seed=[0]):  # noqa: B006 -- the list is a counter shared by every call: each draw differs
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def frozen_tensors(prefix=""):
    """A few of the frozen CLIP tensors the whole-model checkpoints carry."""
    return {
        f"{prefix}image_encoder.conv1.weight": randn(VISION, 3, 8, 8),
        f"{prefix}text_encoder.ln_final.weight": randn(TEXT),
        f"{prefix}text_encoder.transformer.resblocks.0.attn.in_proj_weight": randn(3 * TEXT, TEXT),
        f"{prefix}logit_scale": torch.tensor(4.6),
    }


def class_buffers(prefix, n_ctx):
    return {f"{prefix}token_prefix": randn(len(CLASSES), 1, TEXT),
            f"{prefix}token_suffix": randn(len(CLASSES), 76 - n_ctx, TEXT)}


def released_state(method):
    if method == "coop":
        return {"ctx": randn(4, TEXT), **class_buffers("", 4)}
    if method == "kgcoop":
        return {"ctx": randn(4, TEXT), "bias_vectors": randn(1, 512), "meta_net.linear1.weight": randn(512, 512),
                "meta_net.linear1.bias": randn(512), **class_buffers("", 4)}
    if method == "cocoop":
        return {"ctx": randn(4, TEXT), "meta_net.linear1.weight": randn(EMBED // 16, EMBED),
                "meta_net.linear1.bias": randn(EMBED // 16), "meta_net.linear2.weight": randn(TEXT, EMBED // 16),
                "meta_net.linear2.bias": randn(TEXT), **class_buffers("", 4)}
    if method == "prograd":  # as released: fp16, one shared context of 16 tokens
        return {"ctx": randn(16, TEXT).half(), **class_buffers("", 16)}
    if method == "tcp":
        return {"ctx": randn(4, TEXT).half(), "meta_net.linear1.weight": randn(EMBED // 4, EMBED).half(),
                "meta_net.linear1.bias": randn(EMBED // 4).half(),
                "meta_net.linear2.weight": randn(4 * TEXT, EMBED // 4).half(),
                "meta_net.linear2.bias": randn(4 * TEXT).half(), **class_buffers("", 4)}
    if method in ("ivlp", "promptsrc"):
        state = {"prompt_learner.ctx": randn(4, TEXT), "image_encoder.VPT": randn(4, VISION),
                 **class_buffers("prompt_learner.", 4), **frozen_tensors()}
        for layer in (1, 2):
            state[f"text_encoder.transformer.resblocks.{layer}.VPT_shallow"] = randn(4, TEXT)
            state[f"image_encoder.transformer.resblocks.{layer}.VPT_shallow"] = randn(4, VISION)
        if method == "promptsrc":
            state["prompt_learner.ZS_image_encoder.conv1.weight"] = randn(VISION, 3, 8, 8)
        return state
    if method == "maple":  # released in fp16 (PREC fp16; the first projection is always .half())
        state = {"prompt_learner.ctx": randn(2, TEXT).half(), "prompt_learner.proj.weight": randn(VISION, TEXT).half(),
                 "prompt_learner.proj.bias": randn(VISION).half(), **class_buffers("prompt_learner.", 2),
                 **frozen_tensors()}
        for index in (0, 1):
            state[f"prompt_learner.compound_prompts_text.{index}"] = randn(2, TEXT).half()
            state[f"prompt_learner.compound_prompt_projections.{index}.weight"] = randn(VISION, TEXT).half()
            state[f"prompt_learner.compound_prompt_projections.{index}.bias"] = randn(VISION).half()
        return state
    raise AssertionError(method)


# Where every released tensor must land in our checkpoint.
EXPECTED_NAMES = {
    "coop": {"ctx": "ctx"},
    "kgcoop": {"ctx": "ctx"},
    "prograd": {"ctx": "ctx"},
    "tcp": {key: key for key in ("ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                                 "meta_net.linear2.bias")},
    "cocoop": {"ctx": "ctx", "meta_net.linear1.weight": "meta_net.0.weight", "meta_net.linear1.bias": "meta_net.0.bias",
               "meta_net.linear2.weight": "meta_net.2.weight", "meta_net.linear2.bias": "meta_net.2.bias"},
    "ivlp": {"prompt_learner.ctx": "text_prompts.layers.0", "image_encoder.VPT": "vision_prompts.layers.0",
             **{f"text_encoder.transformer.resblocks.{i}.VPT_shallow": f"text_prompts.layers.{i}" for i in (1, 2)},
             **{f"image_encoder.transformer.resblocks.{i}.VPT_shallow": f"vision_prompts.layers.{i}" for i in (1, 2)}},
    "maple": {"prompt_learner.ctx": "text_prompts.layers.0", "prompt_learner.proj.weight": "coupling.0.weight",
              "prompt_learner.proj.bias": "coupling.0.bias",
              **{f"prompt_learner.compound_prompts_text.{i}": f"text_prompts.layers.{i + 1}" for i in (0, 1)},
              **{f"prompt_learner.compound_prompt_projections.{i}.{k}": f"coupling.{i + 1}.{k}"
                 for i in (0, 1) for k in ("weight", "bias")}},
}
EXPECTED_NAMES["promptsrc"] = EXPECTED_NAMES["ivlp"]


def write_dassl(path, state, epoch=5, legacy=False):
    """A Dassl checkpoint: state_dict, epoch, optimizer state and a scheduler object of Dassl's own class;
    ``legacy``: in the pre-zip format of torch < 1.6 (``_use_new_zipfile_serialization=False``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module = types.ModuleType("dassl_lr_scheduler")  # stands for dassl.optim.lr_scheduler

    class ConstantWarmupScheduler:
        def __init__(self):
            self.successor_state = {"T_max": 5}
            self.last_epoch = epoch

    ConstantWarmupScheduler.__module__ = module.__name__
    ConstantWarmupScheduler.__qualname__ = "ConstantWarmupScheduler"
    module.ConstantWarmupScheduler = ConstantWarmupScheduler
    sys.modules[module.__name__] = module
    try:
        params = [torch.nn.Parameter(v.float().clone()) for v in state.values()][:1]
        optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9)
        params[0].grad = torch.ones_like(params[0])
        optimizer.step()
        torch.save({"state_dict": state, "epoch": epoch, "optimizer": optimizer.state_dict(),
                    "scheduler": ConstantWarmupScheduler(), "val_result": None}, path,
                   _use_new_zipfile_serialization=not legacy)
    finally:
        del sys.modules[module.__name__]  # the reader cannot import Dassl's classes, like this machine
    return path


def convert(tmp_path, method, state, *extra):
    source = write_dassl(tmp_path / "model.pth.tar-5", state)
    out = tmp_path / f"converted-{method}"
    assert convert_main(["--method", method, "--backbone", TINY_CLIP, str(source), "--out", str(out), *extra]) == 0
    return out


def converted_model(clip, folder):
    config, tensors, _ = read_checkpoint(folder)
    torch.manual_seed(123)
    model = create_model(config["method"], CLASSES, backbone=clip, **config["method_options"])
    model.load_adapter_state(tensors)
    return model.eval(), config, tensors


@pytest.mark.parametrize("method", ["coop", "kgcoop", "cocoop", "ivlp", "promptsrc", "maple", "prograd", "tcp"])
def test_every_released_tensor_lands_in_place(tmp_path, clip, method):
    state = released_state(method)
    # TCP's token layer 8 does not exist in the tiny CLIP's 3 text layers
    folder = convert(tmp_path, method, state, *(["--option", "token_layer=2"] if method == "tcp" else []))
    config, tensors, _ = read_checkpoint(folder)
    assert config["method"] == method and config["backbone"] == TINY_CLIP and config["pretrained"] == "openai"
    assert config["converted_from"]["epoch"] == 5
    expected = EXPECTED_NAMES[method]
    assert set(tensors) == set(expected.values())
    for released, ours in expected.items():
        assert tensors[ours].dtype == torch.float32
        assert torch.equal(tensors[ours], state[released].float()), (released, ours)
    assert config["run_config"]["model"]["pretrained"] == "openai"
    assert config["run_config"]["method"]["name"] == method


def test_converted_coop_cocoop_kgcoop_give_released_logits(tmp_path, clip, images):
    for method in ("coop", "kgcoop", "cocoop"):
        (tmp_path / method).mkdir()
        state = released_state(method)
        model, config, _ = converted_model(clip, convert(tmp_path / method, method, state))
        with torch.no_grad():
            if method == "cocoop":
                expected = released_cocoop_logits(
                    clip.model, clip.tokenizer, images, CLASSES, state["ctx"],
                    (state["meta_net.linear1.weight"], state["meta_net.linear1.bias"]),
                    (state["meta_net.linear2.weight"], state["meta_net.linear2.bias"]), "a photo of a",
                )
            else:
                prefix = "X X X X" if method == "coop" else "a photo of a"
                expected = released_coop_logits(clip.model, clip.tokenizer, images, CLASSES, state["ctx"], prefix)
            torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=0)
        assert config["method_options"]["n_ctx"] == 4


def test_converted_deep_prompts_give_released_logits(tmp_path, clip, images):
    for method in ("ivlp", "promptsrc", "maple"):
        (tmp_path / method).mkdir()
        state = {k: v.float() for k, v in released_state(method).items()}
        model, config, _ = converted_model(clip, convert(tmp_path / method, method, state))
        if method == "maple":
            text = [state["prompt_learner.ctx"]] + [state[f"prompt_learner.compound_prompts_text.{i}"] for i in (0, 1)]
            weights = [("prompt_learner.proj.weight", "prompt_learner.proj.bias")] + [
                (f"prompt_learner.compound_prompt_projections.{i}.weight",
                 f"prompt_learner.compound_prompt_projections.{i}.bias") for i in (0, 1)]
            vision = [F.linear(t, state[w], state[b]) for t, (w, b) in zip(text, weights)]
            assert (config["method_options"]["n_ctx"], config["method_options"]["depth"]) == (2, 3)
        else:
            text = [state["prompt_learner.ctx"]] + [state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"]
                                                    for i in (1, 2)]
            vision = [state["image_encoder.VPT"]] + [state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"]
                                                     for i in (1, 2)]
            options = config["method_options"]
            assert ((options["text_depth"], options["vision_depth"], options["n_ctx_text"], options["n_ctx_vision"])
                    == (3, 3, 4, 4))
        with torch.no_grad():
            expected, _, _ = released_deep_logits(clip.model, clip.tokenizer, images, CLASSES, text[0], text[1:],
                                                  vision[0], vision[1:], "a photo of a")
            torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=0)


def test_loading_runs_no_code_from_the_file(tmp_path, clip):
    state = released_state("coop")
    source = tmp_path / "model-best.pth.tar"
    torch.save({"state_dict": state, "epoch": 3, "optimizer": {}, "hook": Payload()}, source)
    out = tmp_path / "out"
    assert convert_main(["--method", "coop", "--backbone", TINY_CLIP, str(source), "--out", str(out)]) == 0
    assert CALLS == []
    assert torch.equal(read_checkpoint(out)[1]["ctx"], state["ctx"])


def test_evaluate_runs_on_a_converted_folder(tmp_path, clip, capsys):
    from mugcp.evaluate import main as evaluate_main

    folder = convert(tmp_path, "maple", released_state("maple"))
    root = make_imagefolder(tmp_path, CLASSES, per_class=2)
    output = tmp_path / "eval"
    code = evaluate_main([
        "--checkpoint", str(folder), "--output", str(output), "model.pretrained=none", "data.dataset=imagefolder",
        f"data.root={root}", "data.protocol=all", "data.eval_batch_size=8", "train.progress=false",
    ])
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["method"] == "maple" and metrics["backbone"] == TINY_CLIP
    assert 0.0 <= metrics["all"]["accuracy"] <= 100.0


def run_refused(argv, capsys) -> str:
    """The line the CLI prints for a refused input (``run_cli`` prints ``error: <message>``, exit 2)."""
    with pytest.raises(ConfigError) as err:
        convert_main(argv)
    return f"error: {err.value}"


def test_refusal_is_one_line_and_exit_status_2(tmp_path):
    plain = tmp_path / "weights.pt"
    torch.save({"ctx": torch.randn(4, TEXT)}, plain)
    done = subprocess.run(
        [sys.executable, "-m", "mugcp.convert", "--method", "coop", "--backbone", "ViT-B-16", str(plain), "--out",
         str(tmp_path / "o")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {plain} is not a Dassl checkpoint: expected a dict with 'state_dict' "
                                   "(and 'epoch', 'optimizer'), found ['ctx'].")


@pytest.mark.parametrize(
    "file_method, method, expected",
    [
        ("maple", "ivlp", "is not a released ivlp checkpoint: keys that do not fit ivlp: "
                          "['prompt_learner.compound_prompt_projections.0.bias'"),
        ("ivlp", "maple", "is not a released maple checkpoint: missing ['prompt_learner.proj.weight', "
                          "'prompt_learner.proj.bias']"),
        ("coop", "cocoop", "is not a released cocoop checkpoint: missing ['meta_net.linear1.weight'"),
        ("cocoop", "coop", "is not a released coop checkpoint: keys that do not fit coop: ['meta_net.linear1.bias', "
                           "'meta_net.linear1.weight', 'meta_net.linear2.bias', 'meta_net.linear2.weight']"),
        ("kgcoop", "coop", "keys that do not fit coop: ['bias_vectors', 'meta_net.linear1.bias', "
                           "'meta_net.linear1.weight']"),
    ],
)
def test_a_file_of_another_method_is_refused_naming_the_keys(tmp_path, clip, capsys, file_method, method, expected):
    source = write_dassl(tmp_path / "model.pth.tar-5", released_state(file_method))
    message = run_refused(["--method", method, "--backbone", TINY_CLIP, str(source),
                           "--out", str(tmp_path / "out")], capsys)
    assert message.startswith(f"error: {source} ")
    assert expected in message
    assert not (tmp_path / "out").exists()


def test_files_that_are_not_dassl_checkpoints_are_refused(tmp_path, clip, capsys):
    plain = tmp_path / "weights.pt"
    torch.save({"ctx": torch.randn(4, TEXT)}, plain)
    message = run_refused(["--method", "coop", "--backbone", TINY_CLIP, str(plain),
                           "--out", str(tmp_path / "o")], capsys)
    assert message == (f"error: {plain} is not a Dassl checkpoint: expected a dict with 'state_dict' "
                       "(and 'epoch', 'optimizer'), found ['ctx'].")

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    message = run_refused(["--method", "coop", "--backbone", TINY_CLIP, str(text),
                           "--out", str(tmp_path / "o")], capsys)
    assert message.startswith(f"error: {text} is not a torch checkpoint")

    message = run_refused(["--method", "coop", "--backbone", TINY_CLIP, str(tmp_path / "missing.tar"),
                           "--out", str(tmp_path / "o")], capsys)
    assert message == (f"error: Dassl checkpoint not found: {tmp_path / 'missing.tar'}. "
                       "Pass a model.pth.tar-N or model-best.pth.tar file.")

    source = write_dassl(tmp_path / "model.pth.tar-1", released_state("coop"))
    message = run_refused(["--method", "zsclip", "--backbone", TINY_CLIP, str(source),
                           "--out", str(tmp_path / "o")], capsys)
    assert message == ("error: --method 'zsclip' has no released checkpoints to convert; choose one of cocoop, coop, "
                       "ivlp, kgcoop, maple, mma, prograd, promptsrc, tcp.")


def test_options_that_contradict_the_shapes_are_refused(tmp_path, clip, capsys):
    source = write_dassl(tmp_path / "model.pth.tar-5", released_state("maple"))
    message = run_refused(["--method", "maple", "--backbone", TINY_CLIP, str(source),
                           "--out", str(tmp_path / "o"), "--option", "depth=9"], capsys)
    assert message == f"error: --option values contradict the tensor shapes in {source}: depth=9 (file: 3)"
    wide = released_state("coop")
    wide["ctx"] = torch.randn(4, 512)
    source = write_dassl(tmp_path / "model.pth.tar-6", wide)
    message = run_refused(["--method", "coop", "--backbone", TINY_CLIP, str(source),
                           "--out", str(tmp_path / "o")], capsys)
    assert (f"{source} does not fit coop on {TINY_CLIP}" in message
            and "shape mismatch ['ctx: (4, 512) vs (4, 48)']" in message)


# ---------------------------------------------------------------- issue 16: --out, legacy files, own messages
def test_legacy_files_are_read_weights_only(tmp_path, clip):
    state = released_state("maple")
    legacy = write_dassl(tmp_path / "legacy" / "model.pth.tar-5", state, legacy=True)
    current = write_dassl(tmp_path / "zip" / "model.pth.tar-5", state)
    assert not zipfile.is_zipfile(legacy) and zipfile.is_zipfile(current)
    for source in (legacy, current):
        assert convert_main(["--method", "maple", "--backbone", TINY_CLIP, str(source),
                             "--out", str(source.parent / "out")]) == 0
    config, tensors, _ = read_checkpoint(legacy.parent / "out")
    _, expected, _ = read_checkpoint(current.parent / "out")
    assert sorted(tensors) == sorted(expected) and all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert config["converted_from"]["epoch"] == 5

    hostile = tmp_path / "hostile.pth.tar"
    torch.save({"state_dict": released_state("coop"), "epoch": 3, "optimizer": {}, "hook": Payload()}, hostile,
               _use_new_zipfile_serialization=False)
    assert convert_main(["--method", "coop", "--backbone", TINY_CLIP, str(hostile), "--out", str(tmp_path / "o")]) == 0
    assert CALLS == []


def test_an_existing_out_is_replaced_only_with_overwrite(tmp_path, clip):
    first, second = released_state("coop"), released_state("coop")
    assert not torch.equal(first["ctx"], second["ctx"])
    out = tmp_path / "out"
    out.mkdir()  # an empty folder holds nothing to lose
    source = write_dassl(tmp_path / "a" / "model.pth.tar-5", first)
    assert convert_main(["--method", "coop", "--backbone", TINY_CLIP, str(source), "--out", str(out)]) == 0
    again = write_dassl(tmp_path / "b" / "model.pth.tar-5", second)
    message = run_refused(["--method", "coop", "--backbone", TINY_CLIP, str(again), "--out", str(out)], None)
    assert message == (f"error: --out {out} already holds a checkpoint: pass --overwrite to replace it, "
                       "or choose another --out.")
    assert torch.equal(read_checkpoint(out)[1]["ctx"], first["ctx"])
    assert convert_main(["--method", "coop", "--backbone", TINY_CLIP, str(again),
                         "--out", str(out), "--overwrite"]) == 0
    assert torch.equal(read_checkpoint(out)[1]["ctx"], second["ctx"])

    run = tmp_path / "run"  # a run folder, not a checkpoint folder: even --overwrite would delete its metrics and logs
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    for extra in ([], ["--overwrite"]):
        message = run_refused(["--method", "coop", "--backbone", TINY_CLIP, str(again),
                               "--out", str(run), *extra], None)
        assert message == (f"error: --out {run} is a folder that holds no checkpoint (no adapter_config.json); "
                           "--overwrite replaces only a checkpoint folder: choose a new folder for --out.")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json"]
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    message = run_refused(["--method", "coop", "--backbone", TINY_CLIP, str(again),
                           "--out", str(plain), "--overwrite"], None)
    assert message == (f"error: --out {plain} is a file; --out names the checkpoint folder to write: "
                       "choose a new folder.")
    assert plain.read_text() == "keep me"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_refusals_are_said_in_our_words(tmp_path, clip, legacy):
    """Nothing of torch's message (which suggests weights_only=False) reaches the user."""
    blocked = tmp_path / "blocked.pth.tar"
    torch.save({"state_dict": released_state("coop"), "epoch": 1, "hook": os.system}, blocked,
               _use_new_zipfile_serialization=not legacy)
    message = run_refused(["--method", "coop", "--backbone", TINY_CLIP, str(blocked),
                           "--out", str(tmp_path / "o")], None)
    assert message == (f"error: {blocked} refers to {os.system.__module__}.system "
                       "(the operating system or interpreter); a checkpoint "
                       "holds tensors and plain values only. Refused: nothing in the file was run.")

    damaged = tmp_path / "damaged.pth.tar"
    if legacy:  # the pickles stay whole, the tensor bytes after them are cut
        data = write_dassl(tmp_path / "model.pth.tar-5", released_state("coop"), legacy=True).read_bytes()
        damaged.write_bytes(data[: len(data) - 64])
    else:  # a zip archive, but not one torch.save wrote
        with zipfile.ZipFile(damaged, "w") as archive:
            archive.writestr("model/readme.txt", "weights are elsewhere")
    message = run_refused(["--method", "coop", "--backbone", TINY_CLIP, str(damaged),
                           "--out", str(tmp_path / "o")], None)
    expected = ("error: {}: cannot read it weights-only (" if legacy
                else "error: {} is not a torch checkpoint: a zip archive, but not one torch.save wrote (")
    assert message.startswith(expected.format(damaged)) and "weights_only" not in message and "\n" not in message
    assert not (tmp_path / "o").exists()
