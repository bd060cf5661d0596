"""Predicting with a trained run: the CLI's rows and files, mugcp.load_run, bad input, MuGCP semantics."""
import csv
import json
import re

import pytest
import torch
from fixtures import make_imagefolder, write_corrupt_image, write_image
from PIL import Image
from test_engine import CLASSES, small_config, write_semantic_cache

import mugcp
from mugcp.cli import run_cli
from mugcp.config import ConfigError
from mugcp.predict import main as predict_main
from mugcp.training import train

BASE = ["blue whale", "red fox"]  # the run's training classes (the first half, sorted)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), CLASSES, per_class={"train": 4, "test": 2})


@pytest.fixture(scope="module")
def coop_run(tmp_path_factory, data_root, shared_clip):
    out = tmp_path_factory.mktemp("coop") / "run"
    train(small_config(data_root, "optim.epochs=1"), out)
    return out


def cli(argv, capsys):
    """Run the CLI in this process (shared backbone); returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: predict_main([str(a) for a in argv]))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_csv_rows_are_ordered_probabilities_and_agree_with_evaluation(tmp_path, coop_run, data_root, capsys):
    folders = [data_root / "test" / name for name in BASE]
    code, out, err = cli(["--checkpoint", coop_run, "--classes", ",".join(BASE), "--top-k", "5", "--out",
                          tmp_path / "p.csv", "--no-progress", *folders], capsys)
    assert code == 0, err
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "error"]  # top-k capped at the 2 classes
    assert len(rows) == 4 and "4 images classified over 2 classes" in out
    assert all(row["error"] == "" for row in rows)
    correct = 0
    for row in rows:
        first, second = float(row["prob_1"]), float(row["prob_2"])
        assert first >= second and 0 < first + second <= 1 + 1e-5
        assert {row["class_1"], row["class_2"]} == set(BASE)
        correct += row["class_1"] == row["path"].split("/")[-2]
    # Same images, same classes as the run's own base evaluation: the same top-1 accuracy.
    metrics = json.loads((coop_run / "metrics.json").read_text())
    assert 100 * correct / 4 == pytest.approx(metrics["base"]["accuracy"])


def test_jsonl_defaults_to_the_runs_classes_and_skips_a_corrupt_image(tmp_path, coop_run, capsys):
    images = tmp_path / "images"
    write_image(images / "a.png", 1, 0)
    write_image(images / "sub" / "b.jpg", 2, 1)
    write_corrupt_image(images / "broken.png")
    code, out, err = cli(["--checkpoint", coop_run, "--top-k", "3", "--out", tmp_path / "p.jsonl", "--no-progress",
                          images], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    # Every image has its line, in the order found; a skipped one says why, with no classes.
    assert [line["path"] for line in lines] == [str(images / "a.png"), str(images / "broken.png"),
                                                str(images / "sub" / "b.jpg")]
    assert lines.pop(1) == {"path": str(images / "broken.png"), "classes": [], "probs": [],
                            "error": "not a recognised image format"}
    for line in lines:
        assert (set(line) == {"path", "classes", "probs", "error"} and line["error"] is None
                and len(line["classes"]) == 3)
        assert line["probs"] == sorted(line["probs"], reverse=True) and sum(line["probs"]) <= 1 + 1e-5
        assert set(line["classes"]) <= set(CLASSES)  # base and new classes of the run's splits.json
    assert "2 images classified over 4 classes" in out and "1 unreadable image skipped" in out
    assert f"skipped {images / 'broken.png'}: not a recognised image format" in err


def test_table_is_printed_without_out(coop_run, data_root, capsys):
    image = data_root / "test" / "red fox" / "red fox_0.png"
    code, out, err = cli(["--checkpoint", coop_run, "--classes", "cat,dog,owl", "--top-k", "2", "--no-progress", image],
                         capsys)
    assert code == 0, err
    header, row = out.strip().splitlines()
    assert header.split() == ["image", "top-1", "top-2"]
    assert row.startswith(str(image)) and len(re.findall(r"(cat|dog|owl) \(\d+\.\d%\)", row)) == 2
    assert "1 images classified over 3 classes" in err


def test_bad_arguments_are_one_line_and_status_2(tmp_path, coop_run, capsys):
    code, _, err = cli(["--checkpoint", coop_run, "--out", tmp_path / "p.txt", tmp_path], capsys)
    assert code == 2 and err.strip() == (
        f"error: --out {tmp_path / 'p.txt'}: the file name must end in .csv or .jsonl (it picks the format).")
    code, _, err = cli(["--checkpoint", coop_run, tmp_path / "nothing.png"], capsys)
    assert code == 2 and err.strip() == (
        f"error: {tmp_path / 'nothing.png'}: no such file or folder. Pass image files or folders of images.")
    code, _, err = cli(["--checkpoint", coop_run, "--classes", "a,,b", tmp_path], capsys)
    assert code == 2 and "give comma-separated non-empty names" in err
    code, _, err = cli(["--checkpoint", coop_run, tmp_path], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path}: no image files in this folder (extensions: .bmp, .gif")


def test_load_run_takes_pil_images_of_any_mode(coop_run, shared_clip):
    model, preprocess = mugcp.load_run(coop_run, classnames=["cat", "dog", "owl"])
    gray = Image.new("L", (30, 20), 120)
    rgba = Image.new("RGBA", (17, 33), (10, 200, 30, 128))
    batch = torch.stack([preprocess(gray), preprocess(rgba)])
    assert batch.shape == (2, 3, 224, 224)
    logits = model(preprocess(gray)[None])
    assert logits.shape == (1, 3)
    predictions = model.predict([gray, rgba], top_k=2)
    assert [len(p.classes) for p in predictions] == [2, 2]
    expected = model(batch).softmax(-1)
    for row, prediction in enumerate(predictions):
        assert prediction.probs == pytest.approx(expected[row].topk(2).values.tolist(), abs=1e-5)
        assert prediction.classes == [model.classnames[i] for i in expected[row].topk(2).indices.tolist()]
    assert model.predict(batch, top_k=1)[1].classes == predictions[1].classes[:1]


def test_wrong_tensor_shapes_say_what_is_expected(coop_run, shared_clip):
    model, preprocess = mugcp.load_run(coop_run)
    with pytest.raises(ValueError) as error:
        model(torch.rand(28, 28))
    assert str(error.value) == (
        "expected a float tensor of preprocessed images with shape (B, 3, 224, 224), got torch.float32 of shape "
        "(28, 28); make them with preprocess(image) (it takes PIL images of any size and mode) and stack them.")
    with pytest.raises(ValueError,
                       match=r"this is one image: add the batch dimension, model\(preprocess\(image\)\[None\]\)"):
        model(preprocess(Image.new("L", (5, 5))))
    with pytest.raises(TypeError, match="preprocess takes a PIL image or an image path, got Tensor"):
        preprocess(torch.rand(3, 28, 28))


def test_class_specific_prompts_refuse_new_class_names(tmp_path, data_root, shared_clip, capsys):
    out = tmp_path / "run"
    train(small_config(data_root, "method.class_specific=true", "optim.epochs=1", "optim.max_steps=1"), out)
    model, _ = mugcp.load_run(out)  # its own classes work
    assert model.classnames == BASE
    capsys.readouterr()  # the training's log lines
    code, _, err = cli(["--checkpoint", out, "--classes", "cat,dog", data_root / "test"], capsys)
    assert code == 2
    assert err.strip() == (
        f"error: checkpoint {out / 'checkpoint'} learned one prompt per class (method option class_specific=true) for "
        "its 2 training classes (blue whale, red fox), so it cannot classify other class names. Omit --classes / "
        "classnames to use its own classes, or train with method.class_specific=false for prompts that transfer.")
    with pytest.raises(ConfigError, match="cannot classify other class names"):
        mugcp.load_run(out, classnames=["red fox", "blue whale"])  # another order is another class list


def test_no_image_classified_is_exit_2_and_out_says_why(tmp_path, coop_run, capsys):
    images = tmp_path / "images"
    write_corrupt_image(images / "a.png")
    write_corrupt_image(images / "b" / "c.jpg")
    code, out, err = cli(["--checkpoint", coop_run, "--out", tmp_path / "p.csv", "--top-k", "1", "--no-progress",
                          images], capsys)
    assert code == 2 and out == ""
    assert err == (f"error: no image classified: all 2 are unreadable, e.g. {images / 'a.png'} (not a recognised image "
                   f"format); {tmp_path / 'p.csv'} lists each with its reason.\n")
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["path", "class_1", "prob_1", "error"],
                    [str(images / "a.png"), "", "", "not a recognised image format"],
                    [str(images / "b" / "c.jpg"), "", "", "not a recognised image format"]]

    code, out, err = cli(["--checkpoint", coop_run, "--no-progress", images / "a.png"], capsys)
    assert code == 2 and out == ""
    assert err == f"error: no image classified: {images / 'a.png'} is unreadable (not a recognised image format).\n"


def test_symlinked_folders_are_followed_once(tmp_path):
    from mugcp.inference.image_files import collect_images
    from mugcp.semantics.sources import image_dir_source

    photos, shared = tmp_path / "photos", tmp_path / "shared"
    write_image(photos / "a.png")
    write_image(shared / "b.png")
    write_image(shared / "deep" / "c.png")
    (photos / "linked").symlink_to(shared, target_is_directory=True)
    (photos / "more").symlink_to(shared, target_is_directory=True)  # a second way to the same folder: its images once
    (shared / "deep" / "up").symlink_to(photos, target_is_directory=True)  # a loop back to the top
    found = collect_images([str(photos)])
    assert [f.relative for f in found] == ["a.png", "linked/b.png", "linked/deep/c.png"]
    assert [f.path for f in found] == [str(photos / "a.png"), str(photos / "linked" / "b.png"),
                                       str(photos / "linked" / "deep" / "c.png")]
    # extract --images lists a folder the same way, so a cache made from it has every image predict finds.
    assert image_dir_source(photos).keys == [f.relative for f in found]


# ---------------------------------------------------------------- MuGCP on MLLM answers
@pytest.fixture(scope="module")
def mugcp_run(tmp_path_factory, data_root, shared_clip):
    folder = tmp_path_factory.mktemp("mugcp")
    write_semantic_cache(folder / "cache", data_root)
    cfg = small_config(data_root, "method=mugcp", "method.depth=1", "method.semantic_features=hidden",
                       "semantic.source=mllm", f"semantic.cache={folder / 'cache'}", "optim.epochs=1",
                       "optim.max_steps=1", "data.max_eval_per_class=1")
    train(cfg, folder / "run")
    return folder / "run"


def test_mugcp_reads_semantics_from_a_cache_keyed_like_extract_images(tmp_path, mugcp_run, capsys):
    from mugcp.semantics import SemanticCache, write_cache

    images = tmp_path / "photos"
    write_image(images / "x.png", 0, 0)
    write_image(images / "deep" / "y.png", 3, 1)
    generator = torch.Generator().manual_seed(1)
    write_cache(tmp_path / "cache", {"x.png": ("a bright thing", torch.randn(3, 24, generator=generator)),
                                     "deep/y.png": ("a round thing", torch.randn(5, 24, generator=generator))},
                manifest_extra={"mllm": "test-mllm", "prompt": "describe"})
    code, out, err = cli(["--checkpoint", mugcp_run, "--semantic-cache", tmp_path / "cache", "--out",
                          tmp_path / "p.jsonl", "--top-k", "4", "--no-progress", images], capsys)
    assert code == 0, err
    rows = {json.loads(line)["path"]: json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()}
    # The probabilities are the model's on each image's own cached answer.
    model, preprocess = mugcp.load_run(mugcp_run)
    cache = SemanticCache(tmp_path / "cache")
    for key in ("x.png", "deep/y.png"):
        hidden = cache[key].float()[None]
        logits = model(preprocess(Image.open(images / key))[None], semantic=hidden,
                       semantic_mask=torch.ones(hidden.shape[:2], dtype=torch.bool))
        assert rows[str(images / key)]["probs"] == pytest.approx(
            logits.softmax(-1)[0].sort(descending=True).values.tolist(), abs=1e-5)

    with_cache, _ = mugcp.load_run(mugcp_run, semantic_cache=tmp_path / "cache")
    image = Image.open(images / "x.png")
    # A batch of one image against the CLI's batch of two: equal up to the files' 6 decimals.
    assert (with_cache.predict([image], keys=["x.png"])[0].probs
            == pytest.approx(rows[str(images / "x.png")]["probs"][:4], abs=2e-6))
    with pytest.raises(ConfigError,
                       match=r"pass image paths, or keys=\[the cache key of each image\] to model.predict"):
        with_cache.predict([image])

    write_image(images / "new.png", 2, 2)  # not in the cache
    code, _, err = cli(["--checkpoint", mugcp_run, "--semantic-cache", tmp_path / "cache", images], capsys)
    assert code == 2 and (f"1 of 3 images have no entry in semantic cache {tmp_path / 'cache'}: "
                          f"{images / 'new.png'}.") in err
    assert "python -m mugcp.extract --mllm test-mllm --images IMAGE_DIR" in err


def test_mugcp_without_semantics_says_exactly_what_to_do(tmp_path, mugcp_run, data_root, capsys):
    code, _, err = cli(["--checkpoint", mugcp_run, data_root / "test"], capsys)
    assert code == 2
    assert err.strip() == (
        f"error: checkpoint {mugcp_run / 'checkpoint'} is MuGCP trained on MLLM answers (semantic_source=mllm, "
        "semantic_features=hidden), so every image needs its MLLM answer: pass --semantic-cache DIR, made first with "
        "`python -m mugcp.extract --mllm test-mllm --images IMAGE_DIR --out DIR` (its keys are paths relative to "
        "IMAGE_DIR), or --mllm test-mllm to run the MLLM on these images now.")
    code, _, err = cli(["--checkpoint", mugcp_run, "--mllm", tmp_path / "no_model", data_root / "test"], capsys)
    assert code == 2 and err.startswith(f"error: --mllm {tmp_path / 'no_model'}: no such directory.")
    model, preprocess = mugcp.load_run(mugcp_run)
    with pytest.raises(ConfigError, match=r"pass semantic_cache=DIR .* or mllm='test-mllm' to mugcp.load_run"):
        model.predict([Image.new("RGB", (8, 8))])


def test_mugcp_runs_the_mllm_on_the_fly_like_its_cache(tmp_path, data_root, shared_clip):
    """Captions from ``--mllm`` now equal captions extracted into a cache first (tiny random LLaVA)."""
    from tiny_mllm import build_tiny_mllm

    from mugcp.extract import main as extract_main

    mllm = build_tiny_mllm(tmp_path / "tiny_mllm")
    images = tmp_path / "photos"
    write_image(images / "x.png", 0, 0, size=(30, 24))
    write_image(images / "y.png", 3, 1, size=(24, 30))
    assert extract_main(["--mllm", str(mllm), "--images", str(images), "--out", str(tmp_path / "cache"),
                         "--max-new-tokens", "6", "--device", "cpu", "--no-progress"]) == 0
    write_semantic_cache(tmp_path / "train_cache", data_root)
    cfg = small_config(data_root, "method=mugcp", "method.depth=1", "semantic.source=mllm",
                       f"semantic.cache={tmp_path / 'train_cache'}",
                       "optim.epochs=1", "optim.max_steps=1", "data.max_eval_per_class=1")
    train(cfg, tmp_path / "run")
    # The run's cache manifest names the MLLM settings (prompt, layer, max_new_tokens) predict reuses.
    (tmp_path / "train_cache" / "manifest.json").write_text((tmp_path / "cache" / "manifest.json").read_text())

    paths = [str(images / "x.png"), str(images / "y.png")]
    with_cache, _ = mugcp.load_run(tmp_path / "run", semantic_cache=tmp_path / "cache")
    on_the_fly, _ = mugcp.load_run(tmp_path / "run", mllm=str(mllm))
    from_cache = with_cache.predict(paths, keys=["x.png", "y.png"], top_k=4)
    live = on_the_fly.predict(paths, top_k=4)
    for a, b in zip(from_cache, live):
        assert a.classes == b.classes and a.probs == pytest.approx(b.probs, abs=1e-4)
