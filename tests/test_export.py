"""Issue 23: a trained run exported to ONNX (python -m mugcp.export) and run by onnxruntime (predict --onnx).

Runs train in-process on the 3-layer tiny CLIP. Tolerance for fp32 logits: 1e-4 absolute. The logits are
the logit scale (about 14.3 here) times cosines, so this is a cosine difference under 1e-5, a few dozen
float32 ulps of 1.0: what reordered float32 sums (onnxruntime fuses layer norms, attention and matmuls)
give after six transformer layers (observed: under 1e-5), and a thousand times finer than any logit gap
that could change a prediction here.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fixtures import make_imagefolder, write_corrupt_image
from PIL import Image
from released_reference import register_tiny_clip

from mugcp.cli import run_cli
from mugcp.config import load_config
from mugcp.data.transforms import OPENAI_MEAN, OPENAI_STD, build_transform
from mugcp.export import main as export_main
from mugcp.inference.onnx_runner import ExportMetadata, OnnxClassifier, preprocess_image
from mugcp.predict import main as predict_main
from mugcp.training import train

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["red fox", "blue whale", "snow owl", "sand cat"]
FP32_TOLERANCE = 1e-4
TINY_MUGCP = [
    "method.depth=2",
    "method.amg_dim=16",
    "method.amg_heads=2",
    "method.pool_dim=16",
    "method.pool_heads=2",
    "semantic.source=clip",
]
METHOD_OPTIONS = {
    "coop": ["method.n_ctx=2"],
    "maple": ["method.depth=2"],
    "promptsrc": ["method.text_depth=2", "method.vision_depth=2", "method.zs_templates=a photo of a {}."],
    "cocoop": [],
    "mugcp": TINY_MUGCP,
    "coop+dept": ["method.n_ctx=2"],  # exported with its trained classes by its own test
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), CLASSES, per_class={"train": 2, "test": 2})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """One tiny trained run per method, trained on first use."""
    made = {}

    def run(method: str) -> Path:
        if method not in made:
            out = tmp_path_factory.mktemp(method) / "run"
            train(
                load_config(
                    None,
                    [
                        "data.dataset=imagefolder",
                        f"data.root={data_root}",
                        "data.shots=2",
                        "data.batch_size=2",
                        "data.eval_batch_size=8",
                        f"method={method}",
                        *METHOD_OPTIONS[method],
                        f"model.backbone={register_tiny_clip()}",
                        "model.pretrained=none",
                        "optim.epochs=1",
                        "optim.lr=0.01",
                        "optim.warmup_epochs=0",
                        "train.progress=false",
                        "train.tensorboard=false",
                    ],
                ),
                out,
            )
            made[method] = out
        return made[method]

    return run


@pytest.fixture(scope="module")
def exports(tmp_path_factory, runs):
    made = {}

    def export(method: str) -> Path:
        if method not in made:
            out = tmp_path_factory.mktemp("onnx") / f"{method}.onnx"
            code, _, err = command(export_main, [runs(method), "--out", out])
            assert code == 0, err
            made[method] = out
        return made[method]

    return export


def command(main, argv, capsys=None):
    """Run a command in this process; (exit status, stdout, stderr) when ``capsys`` captures them."""
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main([str(a) for a in argv]))
    if capsys is None:
        return stop.value.code, "", ""
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


@pytest.mark.parametrize("method", [name for name in METHOD_OPTIONS if not name.endswith("+dept")])
def test_onnxruntime_logits_equal_the_pytorch_run(method, runs, exports):
    from mugcp.inference import load_run

    model, _ = load_run(runs(method))
    classifier = OnnxClassifier(exports(method))
    assert classifier.classnames == model.classnames == ["blue whale", "red fox", "sand cat", "snow owl"]
    generator = torch.Generator().manual_seed(3)
    for batch in (1, 5):  # the export traced a batch of 2: any batch size runs
        images = torch.randn(batch, 3, 32, 32, generator=generator)
        expected = model(images).numpy()
        got = classifier.logits(images.numpy())
        assert got.shape == (batch, 4)
        np.testing.assert_allclose(got, expected, rtol=0, atol=FP32_TOLERANCE)
        # the classes' logits lie far further apart than the tolerance, so it cannot hide a wrong class order
        assert np.ptp(expected, axis=1).min() > 100 * FP32_TOLERANCE


def test_metadata_round_trips(runs, exports):
    props = {entry.key: entry.value for entry in onnx.load(exports("maple")).metadata_props}
    metadata = ExportMetadata.from_props(props, "maple.onnx")
    assert metadata == ExportMetadata(
        classnames=["blue whale", "red fox", "sand cat", "snow owl"],
        method="maple",
        backbone=register_tiny_clip(),
        pretrained="none",
        image_size=32,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        interpolation="bicubic",
        dtype="fp32",
        run=str(runs("maple")),
    )
    assert ExportMetadata.from_props(metadata.to_props(), "again") == metadata


@pytest.mark.parametrize("size, mode", [((50, 37), "RGB"), ((37, 90), "L"), ((32, 32), "RGBA"), ((31, 200), "P")])
def test_preprocessing_equals_the_evaluation_transform(size, mode):
    pixels = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    expected = build_transform(32, train=False)(image.convert("RGB")).numpy()
    np.testing.assert_array_equal(preprocess_image(image, 32, OPENAI_MEAN, OPENAI_STD), expected)


@pytest.mark.parametrize("method", ["coop", "mugcp"])
def test_predict_onnx_gives_the_checkpoints_top1(method, tmp_path, runs, exports, data_root, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(data_root / "test", photos)
    write_corrupt_image(photos / "broken.png")
    by_checkpoint, by_onnx = tmp_path / "checkpoint.jsonl", tmp_path / "onnx.jsonl"
    assert (
        command(predict_main, [photos, "--checkpoint", runs(method), "--out", by_checkpoint, "--device", "cpu"])[0] == 0
    )
    assert command(predict_main, [photos, "--onnx", exports(method), "--out", by_onnx])[0] == 0
    expected = [json.loads(line) for line in by_checkpoint.read_text().splitlines()]
    got = [json.loads(line) for line in by_onnx.read_text().splitlines()]
    assert [row["path"] for row in got] == [row["path"] for row in expected] and len(got) == 9
    assert [row["classes"][:1] for row in got] == [row["classes"][:1] for row in expected]
    assert [row["error"] for row in got] == [row["error"] for row in expected]
    assert [row["error"] for row in got if row["path"].endswith("broken.png")] == ["not a recognised image format"]
    for mine, theirs in zip(got, expected):
        np.testing.assert_allclose(mine["probs"], theirs["probs"], atol=1e-5)


CHILD = """
import runpy, sys
sys.argv = ["python -m mugcp.predict", *sys.argv[1:]]
try:
    runpy.run_module("mugcp.predict", run_name="__main__", alter_sys=True)
except SystemExit as stop:
    print("status", stop.code, "torch imported:", "torch" in sys.modules)
"""


def test_predict_onnx_runs_without_importing_torch(tmp_path, exports, data_root):
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(data_root / "test"), "--onnx", str(exports("coop")), "--top-k", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.stdout.strip().splitlines()[-1] == "status 0 torch imported: False", done.stderr
    assert "8 images classified over 4 classes" in done.stderr
    assert done.stdout.splitlines()[0].split() == ["image", "top-1", "top-2"]


def test_check_prints_the_largest_logit_difference(tmp_path, runs, capsys):
    out = tmp_path / "cocoop.onnx"
    code, printed, _ = command(export_main, [runs("cocoop"), "--out", out, "--check"], capsys)
    assert code == 0
    lines = printed.strip().splitlines()
    assert lines[0].startswith(f"exported cocoop ({register_tiny_clip()}, 4 classes, fp32, 32px) to {out}")
    assert lines[1].startswith("check: onnxruntime vs PyTorch on 4 random images: largest logit difference ")
    difference = float(lines[1].split("largest logit difference ")[1].split()[0])
    assert 0 <= difference < FP32_TOLERANCE


def test_fp16_export_keeps_float32_images_in_and_logits_out(tmp_path, runs):
    from mugcp.inference import load_run

    out = tmp_path / "coop16.onnx"
    assert command(export_main, [runs("coop"), "--out", out, "--dtype", "fp16"])[0] == 0
    classifier = OnnxClassifier(out)
    assert classifier.metadata.dtype == "fp16"
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = load_run(runs("coop"))[0](images).numpy()
    got = classifier.logits(images.numpy())
    assert got.dtype == np.float32
    # fp16 keeps 11 significant bits: cosines to about 1e-3, times the logit scale of about 14
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.05)


def test_export_for_other_classes(tmp_path, runs):
    out = tmp_path / "two.onnx"
    assert command(export_main, [runs("coop"), "--out", out, "--classes", "cat,dog"])[0] == 0
    assert OnnxClassifier(out).classnames == ["cat", "dog"]


def test_a_dept_runs_head_is_in_the_graph_on_the_classes_it_was_trained_on(tmp_path, runs):
    # DePT fuses its head's logits into those of its trained (base) classes; on others CLIP's logits stand alone.
    from mugcp.inference import load_run

    base = ["blue whale", "red fox"]  # the base half the run trained on (sorted names, first half)
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    for classes, fused in ((base, True), (CLASSES, False)):
        out = tmp_path / f"{len(classes)}.onnx"
        assert command(export_main, [runs("coop+dept"), "--out", out, "--classes", ",".join(classes)])[0] == 0
        assert OnnxClassifier(out).metadata.method == "coop+dept"
        model, _ = load_run(runs("coop+dept"), classnames=classes)
        assert (model.learner.dept.rows is not None) == fused
        expected = model(images).numpy()
        np.testing.assert_allclose(OnnxClassifier(out).logits(images.numpy()), expected, rtol=0, atol=FP32_TOLERANCE)
        learner = model.learner
        with torch.no_grad():
            features = learner.encode_images(images)
            clip_only = learner.logits(features, learner.text_features()).numpy()
        assert np.abs(expected - clip_only).max() > (1e-2 if fused else -1), "the head changed nothing"
        if not fused:
            np.testing.assert_allclose(expected, clip_only, rtol=0, atol=1e-6)


def edited_run(source: Path, tmp_path: Path, **changes) -> Path:
    """A copy of a run whose adapter_config.json has ``changes`` (``method_options`` entries under ``options``)."""
    copy = tmp_path / "edited"
    shutil.copytree(source, copy)
    path = copy / "checkpoint" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["method_options"].update(changes.pop("options", {}))
    config.update(changes)
    path.write_text(json.dumps(config))
    return copy


def test_bad_input_is_one_line_before_anything_is_loaded(tmp_path, runs, capsys, monkeypatch):
    import mugcp.inference.export as export

    monkeypatch.setattr(export, "load_for_export", lambda *a, **k: pytest.fail("loaded a model for bad input"))
    out = tmp_path / "model.onnx"
    (tmp_path / "not_a_run").mkdir()
    cases = [
        ([tmp_path / "missing", "--out", out], f"checkpoint not found: {tmp_path / 'missing'} does not exist."),
        (
            [tmp_path / "not_a_run", "--out", out],
            f"{tmp_path / 'not_a_run'} is not a checkpoint: expected adapter_config.json",
        ),
        (
            [edited_run(runs("coop"), tmp_path / "a", method="coop2"), "--out", out],
            f"{tmp_path / 'a' / 'edited'}: method 'coop2' is unknown to this mugcp "
            "(known: cocoop, coop, ivlp, kgcoop, maple, mma, mugcp, prograd, ",
        ),
        (
            [edited_run(runs("mugcp"), tmp_path / "b", options={"semantic_source": "mllm"}), "--out", out],
            f"{tmp_path / 'b' / 'edited'}: MuGCP with semantic_source='mllm' needs each new image's MLLM answer "
            "at inference, "
            "which an ONNX graph of CLIP cannot compute; export runs trained with semantic.source=clip or none.",
        ),
        (
            [runs("coop"), "--out", tmp_path / "model.pt"],
            f"--out {tmp_path / 'model.pt'}: the file name must end in .onnx.",
        ),
        (
            [runs("coop"), "--out", runs("coop") / "model.onnx"],
            f"--out {runs('coop') / 'model.onnx'} lies inside the run ",
        ),
    ]
    for argv, message in cases:
        code, printed, err = command(export_main, argv, capsys)
        assert code == 2 and printed == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {message}"), err
    assert not out.exists() and not (runs("coop") / "model.onnx").exists()


def test_predict_onnx_bad_input_is_one_line(tmp_path, exports, data_root, capsys):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("not a model")
    cases = [
        (
            [data_root / "test", "--onnx", tmp_path / "missing.onnx"],
            f"--onnx {tmp_path / 'missing.onnx'}: no such file",
        ),
        ([data_root / "test", "--onnx", not_onnx], f"--onnx {not_onnx}: onnxruntime cannot load it"),
        (
            [data_root / "test", "--onnx", exports("coop"), "--classes", "cat,dog"],
            f"--onnx {exports('coop')} was exported for its 4 classes",
        ),
        ([data_root / "test", "--onnx", exports("coop"), "--mllm", "x"], "--mllm does not apply to --onnx"),
    ]
    for argv, message in cases:
        code, _, err = command(predict_main, argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(f"error: {message}"), err


def test_metrics_record_what_the_run_cost(runs):
    metrics = json.loads((runs("coop") / "metrics.json").read_text())
    for subset in ("base", "new"):
        entry = metrics[subset]
        assert entry["eval_time_s"] > 0 and entry["images_per_s"] == pytest.approx(
            entry["total"] / entry["eval_time_s"], rel=0.01
        )
    assert metrics["eval_time_s"] == pytest.approx(
        metrics["base"]["eval_time_s"] + metrics["new"]["eval_time_s"], abs=0.002
    )
    assert metrics["eval_images_per_s"] == pytest.approx(8 / metrics["eval_time_s"], rel=0.01)
    # one epoch at batch 2: every step trained on 2 images, over the training time
    assert metrics["steps"] >= 1
    # train_time_s is recorded to 10 ms; images/s is computed before that rounding
    rounding = 0.005 / metrics["train_time_s"]
    expected = 2 * metrics["steps"] / metrics["train_time_s"]
    assert metrics["train_images_per_s"] == pytest.approx(expected, rel=0.02 + rounding)
    assert metrics["trainable_parameters"] == 96 and metrics["peak_memory_mb"] >= 0
