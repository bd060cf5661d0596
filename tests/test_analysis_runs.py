"""Issue 17 end to end on a tiny MuGCP run: what train, evaluate and inspect write, checked against
independent computations (zero-shot CLIP re-run by hand, counts re-derived from the CSV files)."""
import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from fixtures import make_imagefolder
from PIL import Image
from released_reference import register_tiny_clip
from test_analysis import CLASSES, assert_png

from mugcp.analysis.amg import GATES_SIZE, map_grid_size
from mugcp.analysis.confusion import figure_size
from mugcp.analysis.curves import CURVES_SIZE, read_metrics
from mugcp.config import load_config
from mugcp.training import train

TINY_MUGCP = ["method=mugcp", "method.depth=2", "method.amg_dim=16", "method.amg_heads=2", "method.pool_dim=16",
              "method.pool_heads=2"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), CLASSES, per_class={"train": 4, "test": 3})


@pytest.fixture(scope="module")
def mugcp_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs") / "mugcp"
    cfg = load_config(None, [
        "data.dataset=imagefolder", f"data.root={data_root}", "data.shots=2", "data.batch_size=2",
        "data.eval_batch_size=8", *TINY_MUGCP, f"model.backbone={register_tiny_clip()}", "model.pretrained=none",
        "optim.epochs=2", "optim.lr=0.01", "optim.warmup_epochs=0", "train.progress=false", "train.tensorboard=false",
        "data.compare_zeroshot=true",
    ])
    return out, train(cfg, out)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def zero_shot_by_hand(run: Path, data_root: Path, subset: str) -> dict[str, float]:
    """Zero-shot CLIP's per-class accuracy on the subset's images, from the frozen backbone alone."""
    from mugcp.backbones import load_clip
    from mugcp.data import build_transform
    from mugcp.methods.prompt_text import template_text_features

    clip = load_clip(register_tiny_clip(), pretrained=None)
    rows = read_csv(run / "predictions" / f"{subset}.csv")
    names = [row["class"] for row in read_csv(run / "per_class" / f"{subset}.csv")]
    transform = build_transform(clip.image_size, train=False)
    images = torch.stack([transform(Image.open(data_root / row["key"]).convert("RGB")) for row in rows])
    with torch.no_grad():
        image_features = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)
        text_features = template_text_features(clip, ["a photo of a {}."], names)
    predicted = (image_features @ text_features.t()).argmax(dim=-1)
    hits, counts = Counter(), Counter()
    for row, guess in zip(rows, predicted.tolist()):
        counts[row["label_name"]] += 1
        hits[row["label_name"]] += int(guess == int(row["label"]))
    return {name: 100.0 * hits[name] / counts[name] for name in counts}


def test_training_writes_predictions_per_class_confusion_and_curves(mugcp_run, data_root):
    run, metrics = mugcp_run
    for subset in ("base", "new"):
        predictions = read_csv(run / "predictions" / f"{subset}.csv")
        assert len(predictions) == metrics[subset]["total"] == 6
        assert sum(int(r["correct"]) for r in predictions) == metrics[subset]["correct"]
        per_class = read_csv(run / "per_class" / f"{subset}.csv")
        confusion = Counter((r["label_name"], r["predicted_name"]) for r in predictions)
        assert sum(confusion.values()) == metrics[subset]["total"]
        for row in per_class:
            assert int(row["count"]) == sum(v for (t, _), v in confusion.items() if t == row["class"])
            assert round(float(row["accuracy"]) / 100 * int(row["count"])) == confusion[(row["class"], row["class"])]
        zero_shot = zero_shot_by_hand(run, data_root, subset)
        assert {r["class"]: float(r["zeroshot_accuracy"]) for r in per_class} == pytest.approx(zero_shot)
        assert_png(run / "confusion" / f"{subset}.png", figure_size(2))
        assert (run / "confusion" / f"{subset}_pairs.csv").read_text().startswith("true_index,true,predicted_index")
    records = read_metrics(run / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, metrics["steps"] + 1))
    assert ({r["subset"]: r["accuracy"] for r in records if r["kind"] == "eval"}
            == {s: metrics[s]["accuracy"] for s in ("base", "new")})
    assert f"epoch 2 step 4/4 loss {train_records[-1]['loss']:.4f}" in (run / "log.txt").read_text()
    assert_png(run / "curves.png", CURVES_SIZE)


def test_evaluate_compares_with_zero_shot_on_request(mugcp_run, tmp_path):
    from mugcp.evaluate import main

    run, _ = mugcp_run
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(run), "--output", str(out), "--compare-zeroshot", "data.eval_subsets=[new]",
                 "train.progress=false"]) == 0
    per_class = read_csv(out / "per_class" / "new.csv")
    trained = {r["class"]: r for r in read_csv(run / "per_class" / "new.csv")}
    assert [r["class"] for r in per_class] == list(trained)
    for row in per_class:  # the same model and images as the training run's own evaluation
        assert (row["accuracy"], row["zeroshot_accuracy"]) == (trained[row["class"]]["accuracy"],
                                                               trained[row["class"]]["zeroshot_accuracy"])
    assert len(read_csv(out / "predictions" / "new.csv")) == 6
    assert json.loads((out / "metrics.json").read_text())["new"]["zeroshot_accuracy"] >= 0


def test_inspect_writes_nearest_words_amg_maps_gates_and_sizes(mugcp_run, data_root, tmp_path, capsys):
    from mugcp.inspect import main

    run, _ = mugcp_run
    out = tmp_path / "inspect"
    images = data_root / "test" / "snow owl"
    assert main([str(run), str(images), "--out", str(out), "--top-k", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "amg:" in printed and "nearest_words:" in printed
    words = read_csv(out / "nearest_words.csv")
    assert {(r["parameter"], r["layer"]) for r in words} == {("text_context", "0"), ("text_context", "1")}
    assert len(words) == 2 * 2 * 3  # layers × context tokens × k
    assert "| text_context | 1 | 1 |" in (out / "nearest_words.md").read_text()
    maps = sorted((out / "amg").glob("*.png"))
    assert [p.name for p in maps] == ["snow_owl_0.png", "snow_owl_1.png", "snow_owl_2.png"]
    for path in maps:
        assert_png(path, map_grid_size(2, 4))
    assert_png(out / "gates.png", GATES_SIZE)
    sizes = read_csv(out / "conditional_size.csv")
    assert len(sizes) == 3 * 2 * 2 and all(float(r["shared_norm"]) > 0 for r in sizes)
    assert "semantic_source=clip" in (out / "captions.md").read_text()


def test_inspect_of_a_missing_run_is_one_line(tmp_path, capsys):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mugcp.inspect", str(tmp_path / "nothing"),
                             "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert (result.returncode == 2 and result.stderr.startswith("error: ")
            and len(result.stderr.strip().splitlines()) == 1)


def test_inspect_shows_the_caption_each_image_was_given(tmp_path, data_root):
    from fixtures import write_image
    from test_engine import write_semantic_cache

    from mugcp.inspect import main
    from mugcp.semantics import write_cache

    write_semantic_cache(tmp_path / "train_cache", data_root)
    cfg = load_config(None, [
        "data.dataset=imagefolder", f"data.root={data_root}", "data.shots=1", "data.batch_size=2",
        "data.max_eval_per_class=1", *TINY_MUGCP, "method.semantic_features=caption", "semantic.source=mllm",
        f"semantic.cache={tmp_path / 'train_cache'}", f"model.backbone={register_tiny_clip()}", "model.pretrained=none",
        "optim.epochs=1", "train.progress=false", "train.tensorboard=false",
    ])
    train(cfg, tmp_path / "run")
    write_image(tmp_path / "photos" / "x.png", 0, 0, size=(40, 30))
    write_image(tmp_path / "photos" / "deep" / "y.png", 2, 1, size=(30, 40))
    write_cache(tmp_path / "cache", {"x.png": ("a bright striped thing", torch.zeros(2, 24)),
                                     "deep/y.png": ("a round | thing", torch.zeros(3, 24))},
                manifest_extra={"mllm": "test-mllm", "prompt": "describe"})
    out = tmp_path / "inspect"
    assert main([str(tmp_path / "run"), str(tmp_path / "photos"), "--out", str(out), "--semantic-cache",
                 str(tmp_path / "cache"), "--no-progress"]) == 0
    captions = (out / "captions.md").read_text()
    assert f"| {tmp_path / 'photos' / 'x.png'} | mllm | a bright striped thing |" in captions
    assert f"| {tmp_path / 'photos' / 'deep' / 'y.png'} | mllm | a round / thing |" in captions
    assert sorted(p.name for p in (out / "amg").glob("*.png")) == ["x.png", "y.png"]
