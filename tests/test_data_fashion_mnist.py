"""The Fashion-MNIST idx reader: generated files in both encodings, bad files, and the real data."""
from __future__ import annotations

import gzip
from collections import Counter

import numpy as np
import pytest
from fixtures import fashion_mnist_arrays, make_fashion_mnist

from mugcp.data import FASHION_MNIST_CLASSNAMES, BadImageError, DatasetError, build_dataset, build_protocol
from mugcp.data.fashion_mnist import DEFAULT_ROOT

REAL_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("gz", [True, False])
def test_reads_generated_idx_files(tmp_path, gz):
    root = make_fashion_mnist(tmp_path, n_train=50, n_test=20, gz=gz)
    dataset = build_dataset({"dataset": "fashion_mnist", "root": root, "val_fraction": 0.2})
    assert dataset.classnames == FASHION_MNIST_CLASSNAMES
    assert FASHION_MNIST_CLASSNAMES[0] == "T-shirt/top" and FASHION_MNIST_CLASSNAMES[9] == "Ankle boot"
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (40, 10, 20)
    assert Counter(item.label for item in dataset.val) == {label: 1 for label in range(10)}
    assert ({item.key for item in dataset.train} | {item.key for item in dataset.val}
            == {f"train/{i:05d}" for i in range(50)})
    assert [item.key for item in dataset.test][:3] == ["test/00000", "test/00001", "test/00002"]
    assert all(item.label == int(item.key[-5:]) % 10 for item in dataset.test)
    images, _ = fashion_mnist_arrays(20, seed=2)
    image = dataset.open_image("test/00007")
    assert image.mode == "RGB" and image.size == (28, 28)
    pixels = np.asarray(image)
    assert (pixels == images[7][:, :, None]).all()
    assert dataset.describe("test/00007") == f"fashion-mnist test image #7 ({root})"


def test_val_is_carved_by_a_fixed_seed(tmp_path):
    root = make_fashion_mnist(tmp_path, n_train=100, n_test=10)
    first = build_dataset({"dataset": "fashion_mnist", "root": root})
    again = build_dataset({"dataset": "fashion_mnist", "root": root})
    assert first.val == again.val and len(first.val) == 20


def test_bad_keys(tmp_path):
    dataset = build_dataset({"dataset": "fashion_mnist", "root": make_fashion_mnist(tmp_path, 10, 10)})
    with pytest.raises(BadImageError, match="has only 10 images"):
        dataset.open_image("test/00010")
    with pytest.raises(BadImageError, match="is not a Fashion-MNIST key"):
        dataset.open_image("jpg/image_00001.jpg")


def test_missing_root_and_files(tmp_path):
    with pytest.raises(DatasetError) as err:
        build_dataset({"dataset": "fashion_mnist", "root": tmp_path / "none"})
    assert str(tmp_path / "none") in str(err.value) and "t10k-images-idx3-ubyte[.gz]" in str(err.value)
    root = make_fashion_mnist(tmp_path, 10, 10)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\[.gz\] not found. Expected layout"):
        build_dataset({"dataset": "fashion_mnist", "root": root})


def test_malformed_idx_files(tmp_path):
    root = make_fashion_mnist(tmp_path, 10, 10, gz=False)
    images = root / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte is truncated or padded"):
        build_dataset({"dataset": "fashion_mnist", "root": root})
    make_fashion_mnist(tmp_path, 10, 10, gz=False)  # repair, then break the labels' magic number
    labels = root / "t10k-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte is not an idx file with magic 2049 \(found 2051\)"):
        build_dataset({"dataset": "fashion_mnist", "root": root})


@pytest.mark.skipif(
    not all((DEFAULT_ROOT / name).is_file() for name in REAL_FILES),
    reason=f"Fashion-MNIST is not installed under {DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_files():
    dataset = build_dataset({"dataset": "fashion_mnist", "root": None})
    assert dataset.root == DEFAULT_ROOT
    assert (len(dataset.train) + len(dataset.val), len(dataset.test)) == (60000, 10000)
    assert Counter(item.label for item in dataset.test) == {label: 1000 for label in range(10)}
    assert Counter(item.label for item in dataset.train + dataset.val) == {label: 6000 for label in range(10)}
    # Compare against an independent parse of the raw bytes.
    raw = gzip.decompress((DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").read_bytes())
    raw_labels = gzip.decompress((DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz").read_bytes())
    index = 1234
    assert dataset.test[index].label == raw_labels[8 + index]
    expected = np.frombuffer(raw, dtype=np.uint8, offset=16 + 784 * index, count=784).reshape(28, 28)
    assert (np.asarray(dataset.open_image(f"test/{index:05d}"))[:, :, 1] == expected).all()
    splits = build_protocol({"dataset": "fashion_mnist", "shots": 4, "protocol": "base2new"}, seed=1)
    assert splits.train_classnames == FASHION_MNIST_CLASSNAMES[:5]
    assert splits.eval["new"][1] == FASHION_MNIST_CLASSNAMES[5:]
    assert (len(splits.train), len(splits.eval["base"][0]), len(splits.eval["new"][0])) == (20, 5000, 5000)
