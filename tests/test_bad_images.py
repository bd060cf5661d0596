"""Oversized images (decompression bombs) are unreadable images like any other, on every path that reads images.

A bomb here is a PNG of a few dozen bytes whose header claims 14000 x 14000 pixels; other limits are
tested with ordinary small images and a low ``data.max_image_pixels``. Nothing large is allocated.
"""
import json
import warnings

import pytest
from fixtures import make_imagefolder, write_bomb_image, write_image
from PIL import Image
from test_engine import CLASSES, small_config

from mugcp.cli import run_cli
from mugcp.config import DEFAULTS, ConfigError
from mugcp.config_schema import check_value
from mugcp.data import BadImageError, build_dataset, open_image_file
from mugcp.data.__main__ import main as data_main
from mugcp.errors import UserError
from mugcp.evaluate import main as evaluate_main
from mugcp.predict import main as predict_main
from mugcp.training import train

BOMB_REASON = ("14000 x 14000 = 196,000,000 pixels, over the limit of 89,478,485 (data.max_image_pixels, a guard "
               "against decompression bombs; raise it if the image is genuine)")


def cli(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([str(a) for a in argv]))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_a_bomb_is_a_named_unreadable_image_not_pils_error(tmp_path):
    bomb = write_bomb_image(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100
    with pytest.raises(BadImageError) as info:
        open_image_file(bomb)
    assert str(info.value) == (f"cannot read image '{bomb}' ({bomb}): {BOMB_REASON}. Replace or remove the file, or "
                               "set data.on_bad_image=skip to drop unreadable images.")
    assert info.value.reason == BOMB_REASON and isinstance(info.value, UserError)
    with pytest.raises(BadImageError, match=r"cannot read image 'test/x\.png'"):
        build_dataset({"dataset": "imagefolder", "root": str(make_imagefolder(tmp_path))}).open_image("test/x.png")


def test_the_limit_is_one_number_checked_on_the_header(tmp_path, monkeypatch):
    image = write_image(tmp_path / "a.png", size=(20, 14))  # 280 pixels
    assert open_image_file(image, max_pixels=280).size == (20, 14)
    with pytest.raises(BadImageError, match=r"20 x 14 = 280 pixels, over the limit of 279 \(data\.max_image_pixels"):
        open_image_file(image, max_pixels=279)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    # None: PIL's limit, read when the image is opened
    with pytest.raises(BadImageError, match="over the limit of 100 "):
        open_image_file(image)
    assert Image.MAX_IMAGE_PIXELS == 100  # set aside only while the header is read
    with warnings.catch_warnings():
        # PIL alone would warn above 100 pixels and raise its DecompressionBombError above 200.
        warnings.simplefilter("error")
        assert open_image_file(image, max_pixels=1000).size == (20, 14)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(image)  # PIL's global check is back in force for everyone else


def test_the_config_key_defaults_to_pils_limit_and_is_checked():
    assert DEFAULTS["data"]["max_image_pixels"] is None
    check_value("data.max_image_pixels", 200_000_000)
    for bad in (0, "large", 1.5):
        with pytest.raises(ConfigError, match=r"data\.max_image_pixels=.* is not allowed: expected an integer >= 1, "
                                              r"or null \(PIL's Image\.MAX_IMAGE_PIXELS, 89,478,485 by default\)"):
            check_value("data.max_image_pixels", bad)


def test_data_check_lists_a_bomb_as_unreadable(tmp_path, capsys):
    root = make_imagefolder(tmp_path, ["cat", "dog"], per_class=2)
    bomb = write_bomb_image(root / "test" / "dog" / "huge.png")
    status, out, err = cli(data_main, ["check", "--dataset", "imagefolder", "--root", root, "--no-progress"], capsys)
    assert status == 2 and "Traceback" not in err
    assert f"unreadable: {bomb} ({BOMB_REASON})" in out.splitlines()
    assert "test 5 2 0 1" in [" ".join(line.split()) for line in out.splitlines()]
    assert err.strip().startswith(f"error: imagefolder at {root}: 1 unreadable of 9 images.")

    # --max-image-pixels applies the run's limit: the 20 x 14 images pass at 280 pixels, not at 279
    status, out, _ = cli(data_main, ["check", "--dataset", "imagefolder", "--root", root, "--max-image-pixels", 280],
                         capsys)
    assert status == 2 and out.count("unreadable: ") == 1
    status, out, _ = cli(data_main, ["check", "--dataset", "imagefolder", "--root", root, "--max-image-pixels", 279],
                         capsys)
    assert status == 2 and out.count("unreadable: ") == 9 and "20 x 14 = 280 pixels, over the limit of 279" in out
    status, _, err = cli(data_main, ["check", "--dataset", "imagefolder", "--root", root, "--max-image-pixels", 0],
                         capsys)
    assert status == 2 and err.strip() == "error: --max-image-pixels must be at least 1, got 0."


@pytest.fixture(scope="module")
def bomb_data(tmp_path_factory):
    """Four classes; the test split of base class 'blue whale' holds a bomb, new class 'snow owl' a 40 x 40 image."""
    root = make_imagefolder(tmp_path_factory.mktemp("data"), CLASSES, per_class={"train": 4, "test": 2})
    write_bomb_image(root / "test" / "blue whale" / "bomb.png")
    write_image(root / "test" / "snow owl" / "big.png", size=(40, 40))
    return root


@pytest.fixture(scope="module")
def bomb_run(tmp_path_factory, bomb_data, shared_clip):
    out = tmp_path_factory.mktemp("run") / "run"
    metrics = train(small_config(bomb_data, "data.on_bad_image=skip", "data.max_image_pixels=1000", "optim.epochs=1"),
                    out)
    return out, metrics


def test_training_skips_and_counts_oversized_test_images(bomb_run):
    out, metrics = bomb_run
    assert metrics["base"]["skipped"] == 1 and metrics["base"]["total"] == 4  # the bomb
    assert metrics["new"]["skipped"] == 1 and metrics["new"]["total"] == 4    # 1600 pixels > data.max_image_pixels=1000
    log = (out / "log.txt").read_text()
    assert "bomb.png" in log and "big.png" in log and "Traceback" not in log


def test_resume_and_evaluate_read_the_same_images(tmp_path, bomb_run, bomb_data, shared_clip, capsys):
    out, trained = bomb_run
    resumed = train(small_config(bomb_data, "data.on_bad_image=skip", "data.max_image_pixels=1000", "optim.epochs=1"),
                    out, resume=True)
    def results(metrics, subset):  # what was evaluated, not how long it took
        return {key: value for key, value in metrics[subset].items() if key not in ("eval_time_s", "images_per_s")}

    assert all(results(resumed, subset) == results(trained, subset) for subset in ("base", "new"))
    capsys.readouterr()

    # The run's limit and policy carry over to evaluate; null brings back PIL's limit, under which only the bomb is
    # refused.
    status, _, err = cli(evaluate_main, ["--checkpoint", out, "--output", tmp_path / "e1", "data.eval_subsets=[new]"],
                         capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["new"]["skipped"] == 1
    status, _, err = cli(evaluate_main,
                         ["--checkpoint", out, "--output", tmp_path / "e2", "data.max_image_pixels=null"], capsys)
    assert status == 0, err
    metrics = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert metrics["new"]["skipped"] == 0 and metrics["base"]["skipped"] == 1

    status, _, err = cli(evaluate_main, ["--checkpoint", out, "--output", tmp_path / "e3", "data.on_bad_image=error"],
                         capsys)
    assert status == 2 and "Traceback" not in err
    assert (f"cannot read image 'test/blue whale/bomb.png' ({bomb_data / 'test' / 'blue whale' / 'bomb.png'}): "
            "14000 x 14000 = 196,000,000 pixels, over the limit of 1,000 (data.max_image_pixels") in err


def test_predict_names_and_skips_a_bomb(tmp_path, bomb_run, bomb_data, capsys):
    out, _ = bomb_run
    status, stdout, err = cli(predict_main, ["--checkpoint", out, "--out", tmp_path / "p.csv", "--no-progress",
                                             bomb_data / "test" / "blue whale"], capsys)
    assert status == 0 and "Traceback" not in err
    assert "2 images classified" in stdout and "1 unreadable image skipped" in stdout
    assert f"skipped {bomb_data / 'test' / 'blue whale' / 'bomb.png'}: {BOMB_REASON}" in err
