"""``python -m mugcp.data check``: layouts, split files, image counts, missing and unreadable files, exit status."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import (
    make_coop_dataset,
    make_fashion_mnist,
    make_imagefolder,
    make_manifest,
    write_corrupt_image,
    write_image,
    write_truncated_image,
)

from mugcp.cli import run_cli
from mugcp.data import COOP_DATASETS, build_dataset, build_protocol, save_splits
from mugcp.data.__main__ import main as data_main
from mugcp.data.check import check_dataset

ROOT = Path(__file__).resolve().parents[1]


def cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: data_main(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err.strip()


def rows(out):
    """The printed lines with runs of spaces squeezed, so table rows compare regardless of column width."""
    return [" ".join(line.split()) for line in out.splitlines()]


def layouts(tmp_path):
    """(dataset name, data.root) for one generated dataset of every kind the registry reads."""
    yield "imagefolder", make_imagefolder(tmp_path / "if")
    yield "manifest", make_manifest(tmp_path / "mf")
    yield "fashion_mnist", make_fashion_mnist(tmp_path / "fm")
    for spec in COOP_DATASETS:
        yield spec.name, make_coop_dataset(tmp_path / spec.name, spec.name)


def test_every_registered_layout_checks_clean_with_the_readers_counts(tmp_path):
    for name, root in layouts(tmp_path):
        check = check_dataset(name, root, progress=False)
        dataset = build_dataset({"dataset": name, "root": str(root)})
        assert check.ok, (name, check.problems())
        assert [(s.name, s.images, s.classes) for s in check.splits] == [
            (split, len(dataset.split(split)), len({item.label for item in dataset.split(split)}))
            for split in ("train", "val", "test")
        ], name
        assert check.checked == len({item.key for split in ("train", "val", "test") for item in dataset.split(split)})


def test_clean_dataset_prints_the_table_and_exits_0(tmp_path, capsys):
    root = make_coop_dataset(tmp_path, "caltech101")
    status, out, err = cli(["check", "--dataset", "Caltech-101", "--root", str(root), "--no-progress"], capsys)
    assert status == 0 and err == ""
    assert out.splitlines() == [
        "caltech101: 5 classes, 15 train / 10 val / 10 test images",
        "split  images  classes  missing  unreadable",
        "train      15        5        0           0",
        "val        10        5        0           0",
        "test       10        5        0           0",
        f"OK: caltech101 at {root / 'caltech-101'}: all 35 images are readable.",
    ]


def test_missing_and_unreadable_files_are_named_with_the_fix(tmp_path, capsys):
    root = make_coop_dataset(tmp_path, "dtd")
    images = root / "dtd" / "images"
    (images / "red_fox" / "red_fox_train_0.jpg").unlink()
    write_corrupt_image(images / "blue_whale" / "blue_whale_test_1.jpg")
    write_truncated_image(images / "snow_owl" / "snow_owl_val_0.jpg")
    status, out, err = cli(["check", "--dataset", "dtd", "--root", str(root), "--no-progress"], capsys)
    assert status == 2
    lines = out.splitlines()
    assert lines[2:5] == ["train      15        5        1           0",
                          "val        10        5        0           1",
                          "test       10        5        0           1"]
    assert f"missing: {images / 'red_fox' / 'red_fox_train_0.jpg'}" in lines
    assert f"unreadable: {images / 'blue_whale' / 'blue_whale_test_1.jpg'} (not a recognised image format)" in lines
    assert any(line.startswith(f"unreadable: {images / 'snow_owl' / 'snow_owl_val_0.jpg'} (") for line in lines)
    assert err == (f"error: dtd at {root / 'dtd'}: 1 missing and 2 unreadable of 35 images. Fix: restore those files "
                   "(download or extract the dataset again) or remove them from the split file; a run can also skip "
                   "them with data.on_bad_image=skip.")

    check = check_dataset("dtd", root, open_images=False, progress=False)  # presence only: the corrupt files pass
    assert len(check.missing) == 1 and check.unreadable == []


def test_layout_problems_are_one_line_with_the_expected_layout(tmp_path, capsys):
    status, out, err = cli(["check", "--dataset", "oxford_pets", "--root", str(tmp_path)], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"error: dataset 'oxford_pets': {tmp_path / 'oxford_pets' / 'split_zhou_OxfordPets.json'} "
                          "not found. Expected layout:")
    status, _, err = cli(["check", "--dataset", "petz", "--root", str(tmp_path)], capsys)
    assert status == 2 and err.startswith("error: unknown data.dataset 'petz'. Did you mean: oxford_pets?")


def test_a_runs_split_file_is_checked_against_the_dataset(tmp_path, capsys):
    root = make_imagefolder(tmp_path, ["red fox", "blue whale", "snow owl", "sand cat"],
                            per_class={"train": 4, "test": 2})
    data_cfg = {"dataset": "imagefolder", "root": str(root), "shots": 2, "protocol": "base2new",
                "val_fraction": 0.2, "val_seed": 0}
    splits = build_protocol(data_cfg, seed=1)
    save_splits(splits, tmp_path / "splits.json")
    status, out, _ = cli(["check", "--dataset", "imagefolder", "--root", str(root),
                          "--split-file", str(tmp_path / "splits.json")], capsys)
    assert status == 0
    assert "splits.json train 4 2 0 0" in rows(out) and "splits.json eval new 4 2 0 0" in rows(out)

    data = json.loads((tmp_path / "splits.json").read_text())
    data["train"]["items"].append(["train/red fox/gone.png", 0, "red fox"])
    (tmp_path / "splits.json").write_text(json.dumps(data))
    status, out, err = cli(["check", "--dataset", "imagefolder", "--root", str(root),
                            "--split-file", str(tmp_path / "splits.json")], capsys)
    assert status == 2 and "not in the dataset: train/red fox/gone.png" in out.splitlines()
    assert "1 split-file entries name images the dataset does not list" in err and "regenerate it" in err


def test_a_coop_format_split_file_is_read_for_coop_datasets_only(tmp_path, capsys):
    root = make_coop_dataset(tmp_path, "eurosat")
    split_file = root / "eurosat" / "split_zhou_EuroSAT.json"
    status, out, _ = cli(["check", "--dataset", "eurosat", "--root", str(root),
                          "--split-file", str(split_file)], capsys)
    assert status == 0 and "split_zhou_EuroSAT.json test 10 5 0 0" in rows(out)
    other = make_imagefolder(tmp_path)
    status, _, err = cli(["check", "--dataset", "imagefolder", "--root", str(other),
                          "--split-file", str(split_file)], capsys)
    assert status == 2 and "not a MuGCP splits file" in err and "not to imagefolder" in err


def test_many_images_show_a_progress_bar(tmp_path, capsys):
    root = make_fashion_mnist(tmp_path, n_train=150, n_test=20)
    check = check_dataset("fashion_mnist", root, workers=2)
    assert check.ok and check.checked == 170
    assert "opening images" in capsys.readouterr().err


def test_unknown_subcommand_is_refused(capsys):
    assert data_main(["chek"]) == 2
    assert "error: unknown command 'chek'; the commands are: check." in capsys.readouterr().err


def test_python_dash_m_runs_the_check(tmp_path):
    root = make_imagefolder(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "mugcp.data", "check",
                             "--dataset", "imagefolder", "--root", str(root)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("images are readable.")


def test_a_class_folder_without_images_is_named_and_fails_the_check(tmp_path, capsys):
    root = make_imagefolder(tmp_path, ["red fox", "blue whale"], per_class={"train": 2, "test": 1})
    (root / "train" / "zebra").mkdir()  # the class exists (its folder), with no image in train
    (root / "test" / "zebra").mkdir()
    write_image(root / "test" / "zebra" / "z.png")
    status, out, err = cli(["check", "--dataset", "imagefolder", "--root", str(root), "--no-progress"], capsys)
    assert status == 2
    assert "no train images: class 'zebra'" in out.splitlines()
    assert err == (f"error: imagefolder at {root}; 1 class without images in a split. Fix: add images to those classes "
                   "(for an image folder: their class folders) or remove them; a run trains such a class with no "
                   "examples.")


def test_training_on_a_class_without_images_warns_once_naming_it(tmp_path):
    import logging

    from mugcp.data import build_protocol

    root = make_imagefolder(tmp_path, ["red fox", "blue whale"], per_class={"train": 2, "test": 1})
    (root / "train" / "zebra").mkdir()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("mugcp").addHandler(handler)
    try:
        splits = build_protocol({"dataset": "imagefolder", "root": str(root), "shots": 1, "protocol": "all",
                                 "train_classes": "all", "eval_subsets": ["all"]}, seed=1)
    finally:
        logging.getLogger("mugcp").removeHandler(handler)
    assert splits.train_classnames == ["blue whale", "red fox", "zebra"]
    assert [(r.levelname, r.getMessage()) for r in records if "no images" in r.getMessage()] == [(
        "WARNING", f"1 training class of imagefolder has no images: 'zebra'; it is trained with no example. "
                   f"Add images or remove the class (python -m mugcp.data check --dataset imagefolder --root {root} "
                   "lists them).")]
