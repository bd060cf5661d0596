"""Few-shot subsets equal the released code's: Dassl's draw restated here, and CoOp's split_fewshot pickles read
safely."""
from __future__ import annotations

import logging
import os
import pickle
import random
import sys
import types
from collections import defaultdict

import pytest
from fixtures import make_coop_dataset

from mugcp.data import Datum, build_protocol, few_shot
from mugcp.data.fewshot_file import FewShotFileError
from mugcp.errors import UserError


def dassl_generate_fewshot_dataset(data_source, num_shots):
    """Dassl's DatasetBase.generate_fewshot_dataset (repeat=False), restated: the global random module."""
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for items in tracker.values():
        dataset.extend(random.sample(items, num_shots) if len(items) >= num_shots else items)
    return dataset


def released_subsets(train, val, shots, seed):
    """What CoOp's datasets do after set_random_seed(seed): train drawn first, then val with min(K, 4)."""
    state = random.getstate()
    try:
        random.seed(seed)
        return dassl_generate_fewshot_dataset(train, shots), dassl_generate_fewshot_dataset(val, min(shots, 4))
    finally:
        random.setstate(state)


def items_of(counts):
    # Labels out of order and short classes between long ones: the draw order must follow first appearance.
    return [Datum(f"c{label}/{i:03d}.jpg", label, f"class{label}") for label, n in counts for i in range(n)]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shots", [1, 4, 16])
def test_few_shot_is_dassls_draw_short_classes_included(seed, shots):
    items = items_of([(3, 20), (0, 2), (5, 17), (1, 16), (4, 1), (2, 30)])
    expected, _ = released_subsets(items, [], shots, seed)
    assert few_shot(items, shots, seed=seed) == expected


@pytest.fixture
def pets_root(tmp_path):
    return make_coop_dataset(tmp_path, "oxford_pets", per_class={"train": 6, "val": 3, "test": 2})


def pets_cfg(root, **extra):
    return {"dataset": "oxford_pets", "root": str(root), "protocol": "base2new", "train_classes": "all", **extra}


@pytest.mark.parametrize("shots", [2, 4, 8])
def test_protocol_subsets_are_dassls_for_train_then_val(pets_root, shots):
    splits = build_protocol(pets_cfg(pets_root, shots=shots, fewshot_file="none"), seed=2)
    train, val = released_subsets(splits.dataset.train, splits.dataset.val, shots, seed=2)
    assert splits.train == train and splits.val == val


# ---------------------------------------------------------------- CoOp's split_fewshot pickles
class Datum_:
    """Dassl's Datum as the released code pickles it (its module and name, its four attributes)."""

    def __init__(self, impath="", label=0, domain=0, classname=""):
        self._impath, self._label, self._domain, self._classname = impath, label, domain, classname


Datum_.__module__, Datum_.__name__, Datum_.__qualname__ = "dassl.data.datasets.base_dataset", "Datum", "Datum"


@pytest.fixture
def dassl_module(monkeypatch):
    """Makes ``dassl.data.datasets.base_dataset.Datum`` importable, so pickle writes that reference."""
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = types.ModuleType("dassl.data.datasets.base_dataset")
    module.Datum = Datum_
    monkeypatch.setitem(sys.modules, module.__name__, module)


def write_released(path, parts, prefix="/home/someone/DATA/oxford_pets"):
    """A pickle as CoOp writes it: {"train": [Datum...], "val": [...]}, absolute paths of another machine."""
    data = {part: [Datum_(f"{prefix}/{item.key}", item.label, 0, item.classname.replace(" ", "_")) for item in items]
            for part, items in parts.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    assert b"dassl.data.datasets.base_dataset" in path.read_bytes() and b"Datum" in path.read_bytes()
    return path


def chosen(items, step):
    return [item for i, item in enumerate(items) if i % step == 0]


def test_the_released_file_is_used_when_present(pets_root, dassl_module, caplog):
    dataset = build_protocol(pets_cfg(pets_root, shots=2, fewshot_file="none"), seed=1).dataset
    train, val = chosen(dataset.train, 3)[::-1], chosen(dataset.val, 2)  # not what our draw would give
    path = write_released(pets_root / "oxford_pets" / "split_fewshot" / "shot_2-seed_1.pkl",
                          {"train": train, "val": val})
    with caplog.at_level(logging.INFO, logger="mugcp"):
        splits = build_protocol(pets_cfg(pets_root, shots=2), seed=1)
    assert splits.train == train and splits.val == val
    assert f"few-shot subset: the released code's {path}" in caplog.text
    drawn = build_protocol(pets_cfg(pets_root, shots=2, fewshot_file="none"), seed=1)
    assert drawn.train != train  # "none" draws, as without the file
    other_seed = build_protocol(pets_cfg(pets_root, shots=2), seed=2)
    assert other_seed.train == drawn_for(pets_root, shots=2, seed=2)  # shot_2-seed_2.pkl is absent: drawn here


def drawn_for(root, shots, seed):
    return build_protocol(pets_cfg(root, shots=shots, fewshot_file="none"), seed=seed).train


def test_base_classes_come_from_the_released_subset(pets_root, dassl_module):
    dataset = build_protocol(pets_cfg(pets_root, shots=2, fewshot_file="none"), seed=1).dataset
    train = chosen(dataset.train, 3)
    path = write_released(pets_root / "elsewhere.pkl", {"train": train, "val": chosen(dataset.val, 2)},
                          prefix="C:\\data\\oxford_pets")
    splits = build_protocol(dict(pets_cfg(pets_root, shots=2, fewshot_file=str(path)), train_classes="base"), seed=1)
    base = [item for item in train if item.label < 3]
    assert [item.key for item in splits.train] == [item.key for item in base]


def test_a_file_without_val_keeps_the_drawn_val(pets_root, dassl_module):
    # ImageNet's file holds train only; val is drawn as without the file (after the train draw).
    drawn = build_protocol(pets_cfg(pets_root, shots=2, fewshot_file="none"), seed=1)
    path = write_released(pets_root / "train_only.pkl", {"train": chosen(drawn.dataset.train, 4)})
    splits = build_protocol(pets_cfg(pets_root, shots=2, fewshot_file=str(path)), seed=1)
    assert splits.train == chosen(drawn.dataset.train, 4) and splits.val == drawn.val


def test_missing_images_are_refused_by_name(pets_root, dassl_module):
    dataset = build_protocol(pets_cfg(pets_root, shots=2, fewshot_file="none"), seed=1).dataset
    train = chosen(dataset.train, 3)
    path = write_released(pets_root / "released.pkl", {"train": train, "val": []})
    gone = pets_root / "oxford_pets" / train[1].key
    gone.unlink()
    with pytest.raises(FewShotFileError, match=rf"1 of its {len(train)} train images are not .*{train[1].key}") as err:
        build_protocol(pets_cfg(pets_root, shots=2, fewshot_file=str(path)), seed=1)
    assert isinstance(err.value, UserError)
    stranger = write_released(pets_root / "stranger.pkl", {"train": [Datum("images/not_here/x.jpg", 0, "x")]})
    with pytest.raises(FewShotFileError, match=r"images/not_here/x\.jpg"):
        build_protocol(pets_cfg(pets_root, shots=2, fewshot_file=str(stranger)), seed=1)


def test_a_named_file_that_does_not_exist_is_an_error(pets_root):
    with pytest.raises(FewShotFileError, match=r"data.fewshot_file='.*nope.pkl': no such file"):
        build_protocol(pets_cfg(pets_root, shots=2, fewshot_file=str(pets_root / "nope.pkl")), seed=1)


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["system", "eval", "datum_with_reduce"])
def test_a_malicious_pickle_is_refused_without_running(pets_root, tmp_path, dassl_module, payload):
    marker = tmp_path / "ran"
    if payload == "system":
        data = {"train": [RunsACommand(marker)]}
    elif payload == "eval":
        data = {"train": [], "val": EvalCall(f"open({str(marker)!r}, 'w')")}
    else:
        data = {"train": [Datum_("/x/oxford_pets/images/a.jpg"), RunsACommand(marker)]}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(FewShotFileError,
                       match=r"refused as a few-shot file: it refers to (posix|os|builtins)\.(system|eval)"):
        build_protocol(pets_cfg(pets_root, shots=2, fewshot_file=str(path)), seed=1)
    assert not marker.exists()


class EvalCall:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)
