"""Few-shot sampling, base/new classes and the JSON record of a run's splits."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from fixtures import DEFAULT_CLASSES, make_coop_dataset, make_imagefolder

from mugcp.data import (
    DatasetError,
    Datum,
    ProtocolSplits,
    build_dataset,
    build_protocol,
    class_subset,
    few_shot,
    load_splits,
    save_splits,
    subsample_classes,
)

REPO = Path(__file__).resolve().parent.parent


def make_items(per_class: dict[int, int]) -> list[Datum]:
    return [Datum(f"c{label}/{i:03d}.jpg", label, f"class{label}") for label, n in per_class.items() for i in range(n)]


ITEMS = make_items({0: 20, 1: 20, 2: 20, 3: 2})


def keys(items):
    return [item.key for item in items]


def test_few_shot_takes_k_distinct_items_per_class():
    chosen = few_shot(make_items({0: 20, 1: 20, 2: 20}), 5, seed=1)
    assert Counter(item.label for item in chosen) == {0: 5, 1: 5, 2: 5}
    assert len(set(keys(chosen))) == 15
    assert set(keys(chosen)) <= set(keys(ITEMS))


def test_few_shot_is_deterministic_per_seed():
    assert keys(few_shot(ITEMS, 4, seed=1)) == keys(few_shot(ITEMS, 4, seed=1))
    assert keys(few_shot(ITEMS, 4, seed=1)) != keys(few_shot(ITEMS, 4, seed=2))


def test_few_shot_is_the_same_in_a_fresh_interpreter():
    # Across runs: another process, with another hash seed, must pick the same items.
    code = (
        "from mugcp.data import Datum, few_shot\n"
        "items = [Datum(f'c{l}/{i:03d}.jpg', l, f'class{l}') for l, n in {0: 20, 1: 20, 2: 20, 3: 2}.items() "
        "for i in range(n)]\n"
        "print(','.join(item.key for item in few_shot(items, 4, seed=3)))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == keys(few_shot(ITEMS, 4, seed=3))


def test_few_shot_follows_coop_sampling_order():
    # CoOp/Dassl: one Random(seed); per class in order of first appearance, sample(items, K).
    items = make_items({2: 6, 0: 6, 1: 6})
    rng = random.Random(7)
    expected = []
    for label in (2, 0, 1):
        expected += rng.sample([item for item in items if item.label == label], 3)
    assert few_shot(items, 3, seed=7) == expected


def test_few_shot_pads_a_short_class_with_repeats_when_asked():
    chosen = few_shot(ITEMS, 5, seed=1, short_classes="pad")
    short = [item for item in chosen if item.label == 3]
    assert len(short) == 5
    assert set(keys(short)) == {"c3/000.jpg", "c3/001.jpg"}  # both real images, then repeats


def test_few_shot_keeps_a_short_class_whole_by_default():
    chosen = few_shot(ITEMS, 5, seed=1)
    assert keys(item for item in chosen if item.label == 3) == ["c3/000.jpg", "c3/001.jpg"]
    assert Counter(item.label for item in chosen) == {0: 5, 1: 5, 2: 5, 3: 2}


@pytest.mark.parametrize("shots", [None, 0, -1])
def test_few_shot_without_shots_keeps_everything(shots):
    assert few_shot(ITEMS, shots, seed=1) == ITEMS


@pytest.mark.parametrize("n, base, new", [(5, [0, 1, 2], [3, 4]), (4, [0, 1], [2, 3]), (1, [0], [])])
def test_class_subset_base_is_first_ceil_half(n, base, new):
    assert class_subset(n, "base") == base
    assert class_subset(n, "new") == new
    assert class_subset(n, "all") == list(range(n))


def test_subsample_classes_relabels_from_zero():
    names = [f"class{label}" for label in range(4)]
    new_items, new_names = subsample_classes(ITEMS, names, "new")
    assert new_names == ["class2", "class3"]
    assert Counter(item.label for item in new_items) == {0: 20, 1: 2}
    assert all(item.classname == new_names[item.label] for item in new_items)
    assert keys(new_items) == [key for key in keys(ITEMS) if key.startswith(("c2/", "c3/"))]
    base_items, base_names = subsample_classes(ITEMS, names, "base")
    assert base_names == ["class0", "class1"] and {item.label for item in base_items} == {0, 1}
    with pytest.raises(DatasetError, match="unknown class subset 'novel'"):
        subsample_classes(ITEMS, names, "novel")


@pytest.fixture
def pets_root(tmp_path):
    return make_coop_dataset(tmp_path, "oxford_pets", per_class={"train": 6, "val": 5, "test": 3})


def pets_cfg(root, **extra):
    return {"dataset": "oxford_pets", "root": root, "shots": 2, "protocol": "base2new", **extra}


def test_base2new_protocol(pets_root):
    splits = build_protocol(pets_cfg(pets_root), seed=1)
    base_names, new_names = ["red fox", "blue whale", "snow owl"], ["sand cat", "tree frog"]
    assert splits.train_classnames == base_names
    assert Counter(item.label for item in splits.train) == {0: 2, 1: 2, 2: 2}
    assert Counter(item.label for item in splits.val) == {0: 2, 1: 2, 2: 2}  # min(K, 4)
    base_items, base_eval_names = splits.eval["base"]
    new_items, new_eval_names = splits.eval["new"]
    assert (base_eval_names, new_eval_names) == (base_names, new_names)
    assert Counter(item.label for item in base_items) == {0: 3, 1: 3, 2: 3}
    assert Counter(item.label for item in new_items) == {0: 3, 1: 3}
    assert all(item.classname == new_names[item.label] for item in new_items)
    assert all(item.key.startswith("images/sand_cat/") for item in new_items if item.label == 0)
    assert splits.dataset.name == "oxford_pets" and splits.seed == 1 and splits.shots == 2


def test_protocol_keeps_short_classes_whole(pets_root):
    splits = build_protocol(pets_cfg(pets_root, shots=8, train_classes="all"), seed=1)
    assert sorted(keys(splits.train)) == sorted(keys(splits.dataset.train))  # 6 < 8 images: every one, once
    assert Counter(item.label for item in splits.val) == {label: 4 for label in range(5)}


def test_protocol_val_is_min_k_4_and_shots_repeat(pets_root):
    splits = build_protocol(pets_cfg(pets_root, shots=8, train_classes="all", fewshot_short_classes="pad"), seed=1)
    assert Counter(item.label for item in splits.train) == {label: 8 for label in range(5)}
    for label in range(5):
        train_keys = [item.key for item in splits.train if item.label == label]
        val_keys = [item.key for item in splits.val if item.label == label]
        assert len(set(train_keys)) == 6  # all 6 train images once, then 2 repeats
        assert len(val_keys) == len(set(val_keys)) == 4  # min(8, 4) of the 5 val images


def test_protocol_determinism_and_seed_override(pets_root):
    first = build_protocol(pets_cfg(pets_root), seed=1)
    assert build_protocol(pets_cfg(pets_root), seed=1) == first
    assert build_protocol(pets_cfg(pets_root), seed=2).train != first.train
    assert build_protocol(pets_cfg(pets_root, seed=1), seed=99).train == first.train


def test_fewshot_protocol_uses_all_classes(pets_root):
    splits = build_protocol(pets_cfg(pets_root, protocol="fewshot", shots=1), seed=1)
    assert splits.train_classnames == [name.replace("_", " ") for name in DEFAULT_CLASSES]
    assert list(splits.eval) == ["all"] and len(splits.eval["all"][0]) == 15
    with pytest.raises(DatasetError, match="unknown data.protocol 'b2n'"):
        build_protocol(pets_cfg(pets_root, protocol="b2n"), seed=1)


def test_eval_cap_and_eval_split(pets_root):
    capped = build_protocol(pets_cfg(pets_root, max_eval_per_class=2), seed=1)
    other_seed = build_protocol(pets_cfg(pets_root, max_eval_per_class=2), seed=2)
    assert Counter(item.label for item in capped.eval["new"][0]) == {0: 2, 1: 2}
    assert capped.eval == other_seed.eval  # the evaluation set does not move with the run seed
    on_val = build_protocol(pets_cfg(pets_root, eval_split="val", eval_subsets=["all"]), seed=1)
    assert len(on_val.eval["all"][0]) == 25 and all("_val_" in item.key for item in on_val.eval["all"][0])


def test_test_only_dataset_has_empty_train(tmp_path):
    root = make_coop_dataset(tmp_path, "imagenet_r", per_class={"test": 2})
    splits = build_protocol({"dataset": "imagenet_r", "root": root, "shots": 4, "protocol": "cross_dataset"}, seed=1)
    assert splits.train == [] and splits.val == []
    assert len(splits.eval["all"][0]) == 10


def test_splits_json_round_trip(tmp_path, pets_root):
    splits = build_protocol(pets_cfg(pets_root, max_eval_per_class=2), seed=3)
    path = tmp_path / "run" / "splits.json"
    save_splits(splits, path)
    data = json.loads(path.read_text())
    assert data["format"] == "mugcp.splits/1" and data["dataset"] == "oxford_pets" and data["seed"] == 3
    assert data["train"]["items"][0] == [splits.train[0].key, splits.train[0].label, splits.train[0].classname]
    assert data["eval"]["new"]["classnames"] == ["sand cat", "tree frog"]
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # atomic write leaves no temp file

    loaded = load_splits(path, splits.dataset)
    assert loaded == splits
    assert loaded.dataset is splits.dataset
    rebuilt = load_splits(path)  # rebuilds the dataset from the recorded source
    assert rebuilt == splits and rebuilt.dataset == splits.dataset
    assert rebuilt.dataset.open_image(rebuilt.train[0].key).mode == "RGB"
    save_splits(loaded, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


def test_load_splits_errors(tmp_path, pets_root):
    with pytest.raises(DatasetError, match=r"splits file not found: .*nope.json"):
        load_splits(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DatasetError, match=r"bad.json: not a MuGCP splits file"):
        load_splits(bad)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": "mugcp.splits/1", "dataset": "x"}))
    with pytest.raises(DatasetError, match=r"broken.json: malformed splits file \(KeyError"):
        load_splits(broken)
    splits = build_protocol(pets_cfg(pets_root), seed=1)
    save_splits(splits, tmp_path / "pets.json")
    folder = build_dataset({"dataset": "imagefolder", "root": make_imagefolder(tmp_path, ["a"], per_class=2)})
    with pytest.raises(DatasetError, match="these splits are for dataset 'oxford_pets', not 'imagefolder'"):
        load_splits(tmp_path / "pets.json", folder)


def test_from_json_without_dataset_keeps_items(pets_root):
    splits = build_protocol(pets_cfg(pets_root), seed=1)
    again = ProtocolSplits.from_json(json.loads(json.dumps(splits.to_json())))
    assert again == splits and again.dataset is None
