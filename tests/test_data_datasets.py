"""Every dataset layout, read from small generated trees: counts, labels, class names, keys, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import (
    DEFAULT_CLASSES,
    make_coop_dataset,
    make_imagefolder,
    make_manifest,
    wnid,
    write_corrupt_image,
)

from mugcp.data import COOP_DATASETS, BadImageError, DatasetError, build_dataset, canonical_dataset_name
from mugcp.data.coop import AIRCRAFT, IMAGENET, IMAGENET_TEST_ONLY, IMAGENET_V2, SPLIT_JSON

SPECS = {spec.name: spec for spec in COOP_DATASETS}
AIRCRAFT_VARIANTS = ["707-320", "Boeing 737-200", "F/A-18", "DC-10"]


def _spaced(names):
    return [name.replace("_", " ") for name in names]


def _check_images_open(dataset, items):
    for item in items:
        image = dataset.open_image(item.key)
        assert image.mode == "RGB" and image.size == (20, 14)
        assert Path(dataset.describe(item.key)).is_file()


@pytest.mark.parametrize("name", [spec.name for spec in COOP_DATASETS if spec.layout == SPLIT_JSON])
def test_split_json_datasets(tmp_path, name):
    spec = SPECS[name]
    root = make_coop_dataset(tmp_path, name, per_class={"train": 3, "val": 2, "test": 1})
    dataset = build_dataset({"dataset": name, "root": str(root)})
    n = len(DEFAULT_CLASSES)
    assert dataset.name == name
    assert dataset.root == root / spec.folder
    assert dataset.classnames == _spaced(DEFAULT_CLASSES)
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (3 * n, 2 * n, n)
    for split in (dataset.train, dataset.val, dataset.test):
        assert sorted({item.label for item in split}) == list(range(n))
        for item in split:
            assert item.classname == dataset.classnames[item.label]
            assert item.key.startswith(spec.image_dir + "/" if spec.image_dir else "cars_")
    _check_images_open(dataset, dataset.train[:2] + dataset.test[:1])


def test_split_json_keys_join_image_dir_and_relpath(tmp_path):
    root = make_coop_dataset(tmp_path, "flowers102", per_class=1)
    dataset = build_dataset({"dataset": "flowers102", "root": root})
    split = json.loads((root / "oxford_flowers" / "split_zhou_OxfordFlowers.json").read_text())
    assert [item.key for item in dataset.train] == ["jpg/" + row[0] for row in split["train"]]
    assert [item.label for item in dataset.train] == [row[1] for row in split["train"]]


def test_imagenet_layout(tmp_path):
    root = make_coop_dataset(tmp_path, "imagenet", classes=DEFAULT_CLASSES[:3], per_class={"train": 3, "test": 2})
    dataset = build_dataset({"dataset": "ImageNet", "root": root})
    assert dataset.classnames == list(DEFAULT_CLASSES[:3])  # classnames.txt names are used verbatim
    assert (len(dataset.train), len(dataset.test)) == (9, 6)
    assert dataset.val == dataset.test  # CoOp: ImageNet's val set is both val and test
    assert dataset.train[0].key == f"images/train/{wnid(0)}/{wnid(0)}_0.JPEG"
    assert dataset.test[-1].key == f"images/val/{wnid(2)}/{wnid(2)}_1.JPEG"
    assert [item.label for item in dataset.test] == [0, 0, 1, 1, 2, 2]
    _check_images_open(dataset, dataset.train[:1] + dataset.test[:1])


@pytest.mark.parametrize("name", ["imagenet_sketch", "imagenet_a", "imagenet_r"])
def test_imagenet_test_only_variants_label_their_own_folders(tmp_path, name):
    # ImageNet-A/-R hold 200 of ImageNet's 1000 classes: labels follow the folders that exist.
    root = make_coop_dataset(tmp_path, name, per_class={"test": 2}, present=[1, 3, 4])
    dataset = build_dataset({"dataset": name, "root": root})
    assert dataset.classnames == [DEFAULT_CLASSES[1], DEFAULT_CLASSES[3], DEFAULT_CLASSES[4]]
    assert dataset.train == [] and dataset.val == []
    assert [item.label for item in dataset.test] == [0, 0, 1, 1, 2, 2]
    assert dataset.test[2].key == f"{SPECS[name].image_dir}/{wnid(3)}/0.jpg"
    _check_images_open(dataset, dataset.test)


def test_imagenet_v2_numeric_folders(tmp_path):
    root = make_coop_dataset(tmp_path, "imagenet_v2", per_class={"test": 1})
    dataset = build_dataset({"dataset": "imagenet_v2", "root": root})
    assert dataset.classnames == list(DEFAULT_CLASSES)
    assert [(item.key, item.label) for item in dataset.test] == [
        (f"imagenetv2-matched-frequency-format-val/{label}/0.jpg", label) for label in range(len(DEFAULT_CLASSES))
    ]
    _check_images_open(dataset, dataset.test)


def test_fgvc_aircraft_variant_files(tmp_path):
    root = make_coop_dataset(tmp_path, "fgvc_aircraft", classes=AIRCRAFT_VARIANTS,
                             per_class={"train": 2, "val": 1, "test": 1})
    dataset = build_dataset({"dataset": "FGVCAircraft", "root": root})
    assert dataset.classnames == AIRCRAFT_VARIANTS  # names with spaces and slashes survive
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (8, 4, 4)
    assert [item.label for item in dataset.train] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert dataset.train[2].classname == "Boeing 737-200"
    assert dataset.train[0].key == "images/1000001.jpg"
    _check_images_open(dataset, dataset.test)


def test_all_fifteen_coop_datasets_are_registered():
    assert len(COOP_DATASETS) == 15
    layouts = {spec.layout for spec in COOP_DATASETS}
    assert layouts == {SPLIT_JSON, IMAGENET, IMAGENET_TEST_ONLY, IMAGENET_V2, AIRCRAFT}


@pytest.mark.parametrize(
    "spelling, canonical",
    [
        ("Caltech101", "caltech101"), ("caltech-101", "caltech101"), ("OxfordPets", "oxford_pets"),
        ("oxford_pets", "oxford_pets"), ("StanfordCars", "stanford_cars"), ("OxfordFlowers", "flowers102"),
        ("Flowers102", "flowers102"), ("Food101", "food101"), ("FGVCAircraft", "fgvc_aircraft"),
        ("SUN397", "sun397"), ("DescribableTextures", "dtd"), ("DTD", "dtd"), ("EuroSAT", "eurosat"),
        ("UCF101", "ucf101"), ("ImageNet", "imagenet"), ("ImageNetV2", "imagenet_v2"), ("imagenet-v2", "imagenet_v2"),
        ("ImageNetSketch", "imagenet_sketch"), ("ImageNetA", "imagenet_a"), ("imagenet-rendition", "imagenet_r"),
        ("FashionMNIST", "fashion_mnist"), ("fashion-mnist", "fashion_mnist"), ("ImageFolder", "imagefolder"),
    ],
)
def test_dataset_name_spellings(spelling, canonical):
    assert canonical_dataset_name(spelling) == canonical


def test_unknown_dataset_name_suggests_close_match():
    with pytest.raises(DatasetError, match=r"unknown data.dataset 'caltec101'.*Did you mean: caltech101"):
        build_dataset({"dataset": "caltec101", "root": "/nowhere"})


def test_root_may_be_the_dataset_folder_itself(tmp_path):
    root = make_coop_dataset(tmp_path, "eurosat", per_class=1)
    via_data = build_dataset({"dataset": "eurosat", "root": root})
    via_folder = build_dataset({"dataset": "eurosat", "root": root / "eurosat"})
    assert via_data == via_folder


# ---- bad input -------------------------------------------------------------------------------

def test_missing_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "no_such_data"
    with pytest.raises(DatasetError) as err:
        build_dataset({"dataset": "caltech101", "root": missing})
    message = str(err.value)
    assert str(missing) in message and "does not exist" in message
    assert "caltech-101/split_zhou_Caltech101.json" in message and "101_ObjectCategories" in message


def test_root_not_set_for_a_coop_dataset():
    with pytest.raises(DatasetError, match=r"data.root is not set.*oxford_pets/"):
        build_dataset({"dataset": "oxford_pets", "root": None})


def test_missing_split_file_names_it(tmp_path):
    root = make_coop_dataset(tmp_path, "dtd", per_class=1)
    (root / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(DatasetError) as err:
        build_dataset({"dataset": "dtd", "root": root})
    assert str(root / "dtd" / "split_zhou_DescribableTextures.json") in str(err.value)
    assert "Expected layout" in str(err.value)


def test_missing_image_folder_names_it(tmp_path):
    root = make_coop_dataset(tmp_path, "food101", per_class=1)
    (root / "food-101" / "images").rename(root / "food-101" / "pictures")
    with pytest.raises(DatasetError, match=r"image folder .*food-101/images not found"):
        build_dataset({"dataset": "food101", "root": root})


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "cannot read the split file"),
        (json.dumps({"train": [], "val": []}), "the 'test' list is missing"),
        (json.dumps({"train": [["a.jpg", "zero", "cat"]], "val": [], "test": []}),
         r"train\[0\] is \['a.jpg', 'zero', 'cat'\]"),
        (json.dumps({"train": [["a.jpg", 0, "cat"], ["b.jpg", 0, "dog"]], "val": [], "test": []}),
         "label 0 is named both"),
        (json.dumps({"train": [["a.jpg", 1, "cat"]], "val": [], "test": []}), r"missing labels \[0\]"),
    ],
)
def test_malformed_split_file(tmp_path, content, expected):
    root = make_coop_dataset(tmp_path, "eurosat", per_class=1)
    split_file = root / "eurosat" / "split_zhou_EuroSAT.json"
    split_file.write_text(content)
    with pytest.raises(DatasetError, match=expected) as err:
        build_dataset({"dataset": "eurosat", "root": root})
    assert str(split_file) in str(err.value)


def test_imagenet_folder_missing_from_classnames_txt(tmp_path):
    root = make_coop_dataset(tmp_path, "imagenet", classes=DEFAULT_CLASSES[:2], per_class=1)
    (root / "imagenet" / "images" / "train" / "n99999999").mkdir()
    with pytest.raises(DatasetError, match=r"\['n99999999'\] are not listed in .*classnames.txt"):
        build_dataset({"dataset": "imagenet", "root": root})


def test_aircraft_unknown_variant_names_file_and_line(tmp_path):
    root = make_coop_dataset(tmp_path, "fgvc_aircraft", classes=AIRCRAFT_VARIANTS, per_class=1)
    list_file = root / "fgvc_aircraft" / "images_variant_val.txt"
    list_file.write_text(list_file.read_text() + "1234567 Concorde\n")
    with pytest.raises(DatasetError, match=r"images_variant_val.txt:5: variant 'Concorde' is not listed"):
        build_dataset({"dataset": "fgvc_aircraft", "root": root})


def test_corrupt_image_error_names_key_and_file(tmp_path):
    root = make_coop_dataset(tmp_path, "caltech101", per_class=1)
    dataset = build_dataset({"dataset": "caltech101", "root": root})
    bad = dataset.train[0]
    write_corrupt_image(root / "caltech-101" / bad.key)
    with pytest.raises(BadImageError) as err:
        dataset.open_image(bad.key)
    message = str(err.value)
    assert bad.key in message and str(root / "caltech-101" / bad.key) in message
    assert "not a recognised image format" in message and "on_bad_image=skip" in message
    (root / "caltech-101" / bad.key).unlink()
    with pytest.raises(BadImageError, match="file not found"):
        dataset.open_image(bad.key)


# ---- ImageFolder -----------------------------------------------------------------------------

def test_imagefolder_with_val_folder(tmp_path):
    classes = ["tabby_cat", "dog", "axolotl"]
    root = make_imagefolder(tmp_path, classes, per_class={"train": 4, "val": 2, "test": 3},
                            splits=("train", "val", "test"))
    dataset = build_dataset({"dataset": "imagefolder", "root": root})
    assert dataset.classnames == ["axolotl", "dog", "tabby cat"]  # sorted folders, underscores to spaces
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (12, 6, 9)
    assert dataset.train[0].key == "train/axolotl/axolotl_0.png" and dataset.train[0].label == 0
    assert {item.label for item in dataset.test if "tabby_cat" in item.key} == {2}
    _check_images_open(dataset, dataset.val)


def test_imagefolder_carves_val_from_train_by_seed(tmp_path):
    root = make_imagefolder(tmp_path, ["a", "b"], per_class=10)
    first = build_dataset({"dataset": "imagefolder", "root": root, "val_fraction": 0.2, "val_seed": 0})
    again = build_dataset({"dataset": "imagefolder", "root": root, "val_fraction": 0.2, "val_seed": 0})
    other = build_dataset({"dataset": "imagefolder", "root": root, "val_fraction": 0.2, "val_seed": 5})
    assert (len(first.train), len(first.val)) == (16, 4)
    assert [sum(item.label == label for item in first.val) for label in (0, 1)] == [2, 2]
    assert not {item.key for item in first.train} & {item.key for item in first.val}
    assert first == again
    assert first.val != other.val


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist. Expected layout: ROOT/train/<class name>"):
        build_dataset({"dataset": "imagefolder", "root": tmp_path / "nothing"})
    root = make_imagefolder(tmp_path, ["a", "b"], per_class=1, splits=("train",))
    with pytest.raises(DatasetError, match=r"imagefolder/test not found"):
        build_dataset({"dataset": "imagefolder", "root": root})
    make_imagefolder(tmp_path, ["a", "zebra"], per_class=1, splits=("test",))
    (root / "train" / "b").rename(root / "train" / "c")
    with pytest.raises(DatasetError, match=r"class 'zebra' has no folder in .*train"):
        build_dataset({"dataset": "imagefolder", "root": root})


# ---- manifests -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "json", "json_splits", "csv_folder", "json_folder"])
def test_manifest_formats(tmp_path, fmt):
    classes = ["sea_lion", "otter", "seal"]
    root = make_manifest(tmp_path, classes, per_class={"train": 3, "val": 1, "test": 2}, fmt=fmt,
                         splits=("train", "val", "test"))
    dataset = build_dataset({"dataset": "manifest", "root": root})
    assert dataset.classnames == ["sea lion", "otter", "seal"]  # label order, not alphabetical
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (9, 3, 6)
    assert dataset.root == tmp_path / "manifest"
    assert dataset.train[0].key == "images/train/sea_lion_0.png" and dataset.train[0].label == 0
    _check_images_open(dataset, dataset.test)


def test_manifest_without_classnames_or_val(tmp_path):
    root = make_manifest(tmp_path, ["x", "y"], per_class=5, fmt="csv", with_classnames=False)
    dataset = build_dataset({"dataset": "manifest", "root": root})
    assert dataset.classnames == ["class 0", "class 1"]
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (8, 2, 10)


def test_manifest_errors(tmp_path):
    base = tmp_path / "m"
    base.mkdir()
    no_split = base / "list.csv"
    no_split.write_text("path,label\na.png,0\n")
    with pytest.raises(DatasetError, match=r"list.csv: row 1 \(a.png\) has no split"):
        build_dataset({"dataset": "manifest", "root": no_split})
    gap = base / "gap.json"
    gap.write_text(json.dumps({"train": [["a.png", 0, "a"], ["c.png", 2, "c"]], "test": [["d.png", 0, "a"]]}))
    with pytest.raises(DatasetError, match=r"gap.json: labels must be 0..C-1; no rows for labels \[1\]"):
        build_dataset({"dataset": "manifest", "root": gap})
    clash = base / "clash.json"
    clash.write_text(json.dumps({"train": [["a.png", 0, "cat"], ["b.png", 0, "dog"]], "test": [["d.png", 0, "cat"]]}))
    with pytest.raises(DatasetError, match="label 0 is named both 'cat' and 'dog'"):
        build_dataset({"dataset": "manifest", "root": clash})
    bad_label = base / "bad.csv"
    bad_label.write_text("path,label,split\na.png,cat,train\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: label 'cat' is not an integer"):
        build_dataset({"dataset": "manifest", "root": bad_label})
    (base / "train.csv").write_text("a.png,0,a\n")
    with pytest.raises(DatasetError, match=r"m/test.csv \(or .json\) not found"):
        build_dataset({"dataset": "manifest", "root": base})
    with pytest.raises(DatasetError, match=r"manifest: data.root .*missing.csv does not exist"):
        build_dataset({"dataset": "manifest", "root": base / "missing.csv"})
