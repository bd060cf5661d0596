"""Class lists: validated once for every entry point, and class-specific prompts kept to the classes they learned."""
import csv
import json
import logging
import shutil

import pytest
from fixtures import make_coop_dataset, make_imagefolder, write_image
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from test_engine import CLASSES, small_config

import mugcp
from mugcp.cli import run_cli
from mugcp.data import build_dataset
from mugcp.data.classnames import ClassNamesError, read_classnames_file, validate_classnames
from mugcp.errors import UserError
from mugcp.evaluate import main as evaluate_main
from mugcp.predict import main as predict_main
from mugcp.training import train

BASE, NEW = ["blue whale", "red fox"], ["sand cat", "snow owl"]  # the sorted first and second half of CLASSES


def cli(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([str(a) for a in argv]))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# ---------------------------------------------------------------- one validation
def test_a_list_of_distinct_names_is_cleaned():
    assert validate_classnames(["\ufeffcat ", " dog\t", "sea_lion"]) == ["cat", "dog", "sea_lion"]
    assert validate_classnames(("cat",)) == ["cat"]


@pytest.mark.parametrize("names, message", [
    ("cat,dog", "classnames is one string ('cat,dog'), not a list of class names; a string would be read letter by "
                "letter. Pass a list, e.g. ['cat', 'dog']."),
    ("owl", "classnames is one string ('owl'), not a list of class names; a string would be read letter by letter. "
            "Pass a list, e.g. ['cat', 'dog']."),
    (["cat", 3], "classnames[1] is 3 (int), not a string; class names are text, e.g. '3'."),
    (["cat", None], "classnames[1] is None (NoneType), not a string; class names are text, e.g. 'None'."),
    (["cat", " "], "classnames[1] is an empty class name (' '); every class needs a name."),
    ([], "classnames is empty: give at least one class name."),
    ({"cat", "dog"}, "classnames must be a list of class names (strings), got a set; a set has no order, and the "
                     "order of the names is the order of the labels."),
    (["cat", "dog", "Cat", "sea lion", "sea_lion"],
     "classnames names the same class more than once: classnames[0] 'cat' and classnames[2] 'Cat'; "
     "classnames[3] 'sea lion' and classnames[4] 'sea_lion'. CLIP reads names without case, '_' or extra spaces, "
     "so these would get identical prompts and identical scores. Remove or rename the duplicates."),
])
def test_bad_lists_are_one_clear_error(names, message):
    with pytest.raises(ClassNamesError) as info:
        validate_classnames(names)
    assert str(info.value) == message and isinstance(info.value, UserError)


def test_a_classes_file_loses_its_bom_and_names_lines(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffcat\r\n# a comment\n\n  dog  \n".encode("utf-8"))
    assert read_classnames_file(path) == ["cat", "dog"]
    path.write_text("cat\ndog\nCAT\n", encoding="utf-8")
    with pytest.raises(ClassNamesError, match=r"--classes-file .*classes\.txt line 1 'cat' and --classes-file "
                                              r".*line 3 'CAT'\. .* Keep each class on one line only\."):
        read_classnames_file(path)
    with pytest.raises(ClassNamesError, match="a folder. It must be a text file listing one class name per line"):
        read_classnames_file(tmp_path)


def test_datasets_keep_duplicate_class_names_with_a_warning_and_read_a_bom(tmp_path, caplog):
    # A dataset's classes are fixed by its files, and the standard lists have duplicates: named in a warning, not
    # refused.
    root = make_imagefolder(tmp_path, ["apple_pie", "apple pie", "cat"], per_class=1)
    with caplog.at_level(logging.WARNING, logger="mugcp"):
        dataset = build_dataset({"dataset": "imagefolder", "root": str(root)})
    assert dataset.classnames == ["apple pie", "apple pie", "cat"]
    assert caplog.messages == [
        f"dataset 'imagefolder' ({root}) names the same class more than once: "
        "label 0 'apple pie' and label 1 'apple pie'. "
        "CLIP reads names without case, '_' or extra spaces, so these get identical prompts and identical scores. "
        "Rename or merge those class folders (under train/, val/ and test/) to tell them apart."]
    imagenet = make_coop_dataset(tmp_path / "in", "imagenet", classes=list(IMAGENET_CLASSNAMES[655:660]) + ["missile"],
                                 per_class={"train": 1, "test": 1})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mugcp"):
        assert build_dataset({"dataset": "imagenet", "root": str(imagenet)}).classnames[-1] == "missile"
    assert "label 2 'missile' and label 5 'missile'" in caplog.text and "ImageNet's does" in caplog.text

    folder = tmp_path / "manifest"
    for split in ("train", "test"):
        write_image(folder / f"{split}_a.png")
        write_image(folder / f"{split}_b.png", label=1)
    (folder / "m.csv").write_bytes("\ufeffpath,label,classname,split\n".encode("utf-8") + "".join(
        f"{split}_{x}.png,{label},{name},{split}\n" for split in ("train", "test")
        for x, label, name in (("a", 0, "cat"), ("b", 1, "dog"))
    ).encode("utf-8"))
    assert build_dataset({"dataset": "manifest", "root": str(folder / "m.csv")}).classnames == ["cat", "dog"]


def test_create_model_refuses_a_string_before_loading_a_backbone():
    with pytest.raises(ClassNamesError, match=r"classnames is one string \('cat,dog'\)"):
        mugcp.create_model("coop", "cat,dog", backbone="no-such-backbone")
    with pytest.raises(ClassNamesError, match=r"classnames\[1\] is 3 \(int\)"):
        mugcp.create_model("coop", ["cat", 3], backbone="no-such-backbone")


def test_the_full_imagenet_list_builds_a_model(vit_b32):
    # CLIP's ImageNet names (missile and sunglasses twice) are what the benchmark evaluates with.
    model = mugcp.create_model("zsclip", list(IMAGENET_CLASSNAMES[830:840]), backbone=vit_b32)
    assert model.classnames.count("sunglasses") == 2


# ---------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), CLASSES, per_class={"train": 4, "test": 2})


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, data_root, shared_clip):
    out = tmp_path_factory.mktemp("plain") / "run"
    train(small_config(data_root, "optim.epochs=1", "optim.max_steps=1"), out)
    return out


@pytest.fixture(scope="module")
def specific_run(tmp_path_factory, data_root, shared_clip):
    out = tmp_path_factory.mktemp("specific") / "run"
    metrics = train(small_config(data_root, "method.class_specific=true", "optim.epochs=1", "optim.max_steps=1"), out)
    return out, metrics


def test_load_run_validates_class_names(plain_run, shared_clip):
    with pytest.raises(ClassNamesError, match=r"^classnames is one string \('cat,dog'\), not a list of class names"):
        mugcp.load_run(plain_run, classnames="cat,dog")
    with pytest.raises(ClassNamesError, match=r"^classnames\[1\] is 3 \(int\), not a string"):
        mugcp.load_run(plain_run, classnames=["cat", 3])
    with pytest.raises(ClassNamesError, match=r"classnames\[0\] 'cat' and classnames\[2\] 'cat'"):
        mugcp.load_run(plain_run, classnames=["cat", "dog", "cat"])
    model, _ = mugcp.load_run(plain_run, classnames=[" cat", "\ufeffdog"])
    assert model.classnames == ["cat", "dog"]
    with pytest.raises(ClassNamesError, match="the same class more than once"):
        model.set_classnames(["owl", "Owl"])


def test_predict_reads_a_bom_file_and_refuses_duplicates(tmp_path, plain_run, data_root, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_bytes("\ufeffred fox\nblue whale\n".encode("utf-8"))
    status, _, err = cli(predict_main, ["--checkpoint", plain_run, "--classes-file", classes, "--out",
                                        tmp_path / "p.csv", "--no-progress", data_root / "test" / "red fox"], capsys)
    assert status == 0, err
    rows = list(csv.DictReader(open(tmp_path / "p.csv", newline="", encoding="utf-8")))
    assert {row["class_1"] for row in rows} | {row["class_2"] for row in rows} == {"red fox", "blue whale"}
    status, _, err = cli(predict_main, ["--checkpoint", plain_run, "--classes", "cat,Cat", data_root / "test"], capsys)
    assert status == 2 and err.startswith("error: --classes names the same class more than once: --classes name 1 "
                                          "'cat' and --classes name 2 'Cat'.")


def test_training_does_not_score_new_classes_with_class_specific_prompts(specific_run):
    out, metrics = specific_run
    reason = ("class-specific prompts (method.class_specific=true) cannot score these classes: they were learned for "
              "the 2 training classes (blue whale, red fox), not for these 2 (sand cat, snow owl); train with "
              "method.class_specific=false for prompts that transfer to other classes")
    assert "base" in metrics and "new" not in metrics and "hm" not in metrics
    assert metrics["not_evaluated"] == {"new": reason}
    assert json.loads((out / "metrics.json").read_text())["not_evaluated"] == {"new": reason}
    assert f"new: not evaluated: {reason}" in (out / "log.txt").read_text()


def test_evaluate_refuses_classes_the_prompts_did_not_learn(tmp_path, specific_run, capsys):
    out, trained = specific_run
    checkpoint = out / "checkpoint"
    status, _, err = cli(evaluate_main, ["--checkpoint", out, "--output", tmp_path / "new", "data.eval_subsets=[new]"],
                         capsys)
    assert status == 2 and err == (
        f"error: checkpoint {checkpoint} learned one prompt per class (method option class_specific=true), so it "
        "cannot be evaluated on the 'new' classes of imagefolder: they were learned for the 2 training classes "
        "(blue whale, red fox), not for these 2 (sand cat, snow owl). Evaluate it on the classes it was trained on, "
        "or train with method.class_specific=false for prompts that transfer to other classes.\n")
    assert not (tmp_path / "new").exists()

    # Another number of classes (item 3): one line too, not a shape-mismatch traceback.
    status, _, err = cli(evaluate_main, ["--checkpoint", out, "--output", tmp_path / "all", "data.protocol=all"],
                         capsys)
    assert status == 2 and "cannot be evaluated on the 'all' classes of imagefolder: they were learned for the 2 " \
                           "training classes (blue whale, red fox), not for these 4 (blue whale, red fox, sand cat, " \
                           "snow owl)." in err

    status, _, err = cli(evaluate_main, ["--checkpoint", out, "--output", tmp_path / "base",
                                         "data.eval_subsets=[base]"], capsys)
    assert status == 0, err
    assert (json.loads((tmp_path / "base" / "metrics.json").read_text())["base"]["accuracy"]
            == trained["base"]["accuracy"])


def test_a_bare_class_specific_checkpoint_is_checked_by_its_number_of_contexts(tmp_path, specific_run, capsys):
    out, _ = specific_run
    bare = tmp_path / "bare"
    # no splits.json beside it: the class names are unknown, their number is not
    shutil.copytree(out / "checkpoint", bare)
    status, _, err = cli(evaluate_main, ["--checkpoint", bare, "--output", tmp_path / "all", "data.protocol=all"],
                         capsys)
    assert status == 2 and err.startswith(f"error: checkpoint {bare} learned one prompt per class")
    assert "they were learned for 2 classes, and these are 4 (blue whale, red fox, sand cat, snow owl)." in err
    status, _, err = cli(evaluate_main, ["--checkpoint", bare, "--output", tmp_path / "base",
                                         "data.eval_subsets=[base]"], capsys)
    assert status == 0, err
