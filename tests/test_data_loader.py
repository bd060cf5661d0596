"""Transforms, ImageDataset, collate and the seeded loader."""
from __future__ import annotations

import pytest
import torch
from fixtures import make_imagefolder, write_corrupt_image, write_truncated_image
from PIL import Image
from torchvision.transforms import InterpolationMode

from mugcp.data import (
    OPENAI_MEAN,
    OPENAI_STD,
    BadImageError,
    DatasetError,
    ImageDataset,
    build_dataset,
    build_loader,
    build_transform,
    collate,
    set_loader_epoch,
)

SIZE = 16


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("loader"), ["a", "b", "c"],
                            per_class={"train": 4, "val": 1, "test": 2}, splits=("train", "val", "test"))
    return build_dataset({"dataset": "imagefolder", "root": root})


def gradient_image(width=40, height=30) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256) for y in range(height) for x in range(width)])
    return image


# ---- transforms ------------------------------------------------------------------------------

def test_eval_transform_shape_and_openai_normalisation():
    color = (200, 100, 50)
    out = build_transform(SIZE, train=False)(Image.new("RGB", (37, 23), color))
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    for channel in range(3):
        expected = (color[channel] / 255 - OPENAI_MEAN[channel]) / OPENAI_STD[channel]
        assert torch.allclose(out[channel], torch.full((SIZE, SIZE), expected), atol=1e-5)


def test_eval_transform_resizes_short_side_bicubic_then_center_crops():
    image = gradient_image(40, 20)
    out = build_transform(SIZE, train=False)(image)
    resized = image.resize((32, 16), Image.Resampling.BICUBIC)  # short side 20 -> 16
    expected = build_transform(SIZE, train=False)(resized.crop((8, 0, 24, 16)))
    assert torch.allclose(out, expected, atol=1e-6)
    assert OPENAI_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_STD == (0.26862954, 0.26130258, 0.27577711)


def test_train_transform_is_coop_random_resized_crop_and_flip():
    transform = build_transform(SIZE, train=True, augment=True)
    crop, flip = transform.transforms[0], transform.transforms[1]
    assert type(crop).__name__ == "RandomResizedCrop" and crop.scale == (0.08, 1.0)
    assert crop.interpolation == InterpolationMode.BICUBIC and crop.size == (SIZE, SIZE)
    assert type(flip).__name__ == "RandomHorizontalFlip" and flip.p == 0.5
    image = gradient_image()
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    assert torch.equal(first, transform(image))
    torch.manual_seed(1)
    assert first.shape == (3, SIZE, SIZE) and not torch.equal(first, transform(image))


def test_normalised_tensor_matches_torchvision():
    from torchvision import transforms as T

    image = gradient_image()
    reference = T.Compose([T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])(image)
    ours = build_transform(SIZE, train=False).transforms[-1](image)
    assert ours.dtype == torch.float32 and ours.shape == (3, 30, 40) and ours.is_contiguous()
    assert torch.allclose(ours, reference, atol=1e-6)


def test_train_without_augment_equals_eval():
    image = gradient_image()
    assert torch.equal(build_transform(SIZE, train=True, augment=False)(image),
                       build_transform(SIZE, train=False)(image))


# ---- ImageDataset and collate ----------------------------------------------------------------

def test_image_dataset_item(folder_dataset):
    data = ImageDataset(folder_dataset.test, folder_dataset, build_transform(SIZE, train=False))
    sample = data[3]
    assert sample["image"].shape == (3, SIZE, SIZE)
    assert (sample["label"], sample["key"], sample["index"]) == (1, "test/b/b_1.png", 3)
    batch = collate([data[i] for i in range(len(data))])
    assert batch["images"].shape == (6, 3, SIZE, SIZE)
    assert batch["labels"].tolist() == [0, 0, 1, 1, 2, 2] and batch["labels"].dtype == torch.long
    assert batch["indices"].tolist() == list(range(6)) and batch["n_skipped"] == 0
    assert batch["keys"][0] == "test/a/a_0.png"


@pytest.fixture
def broken_dataset(tmp_path):
    root = make_imagefolder(tmp_path, ["a", "b"], per_class=2)
    write_corrupt_image(root / "train" / "a" / "a_1.png")
    write_truncated_image(root / "train" / "b" / "b_0.png")
    return build_dataset({"dataset": "imagefolder", "root": root, "val_fraction": 0.0})


def test_bad_image_error_names_the_file(broken_dataset):
    data = ImageDataset(broken_dataset.train, broken_dataset, build_transform(SIZE, train=False), on_bad_image="error")
    assert data[0]["key"] == "train/a/a_0.png"
    with pytest.raises(BadImageError) as err:
        data[1]
    assert str(broken_dataset.root / "train" / "a" / "a_1.png") in str(err.value)
    with pytest.raises(BadImageError, match=r"b_0.png.*(truncated|broken data stream)"):
        data[2]


def test_bad_image_skip_is_counted_in_the_batch(broken_dataset):
    data = ImageDataset(broken_dataset.train, broken_dataset, build_transform(SIZE, train=False), on_bad_image="skip")
    loader = build_loader(data, batch_size=4, train=False, seed=0)
    (batch,) = list(loader)
    assert batch["n_skipped"] == 2
    assert batch["skipped_keys"] == ["train/a/a_1.png", "train/b/b_0.png"]
    assert batch["keys"] == ["train/a/a_0.png", "train/b/b_1.png"]
    assert batch["labels"].tolist() == [0, 1] and batch["images"].shape == (2, 3, SIZE, SIZE)
    everything_bad = collate([data[1], data[2]])
    assert everything_bad["images"].shape[0] == 0 and everything_bad["n_skipped"] == 2


def test_unknown_bad_image_policy(broken_dataset):
    with pytest.raises(DatasetError, match="data.on_bad_image must be error or skip, got 'ignore'"):
        ImageDataset(broken_dataset.train, broken_dataset, build_transform(SIZE, train=False), on_bad_image="ignore")


def test_semantic_features_are_padded_with_a_mask(folder_dataset):
    items = folder_dataset.test[:3]
    features = {item.key: torch.full((length, 5), float(length), dtype=torch.float16)
                for item, length in zip(items, (2, 4, 1))}
    data = ImageDataset(items, folder_dataset, build_transform(SIZE, train=False), semantic=features)
    batch = collate([data[i] for i in range(3)])
    assert batch["semantic"].shape == (3, 4, 5) and batch["semantic"].dtype == torch.float32
    assert batch["semantic_mask"].tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert batch["semantic"][0, :2].eq(2).all() and batch["semantic"][0, 2:].eq(0).all()
    assert batch["semantic"][2, 0].eq(1).all() and batch["semantic"][2, 1:].eq(0).all()


def test_missing_semantic_features_are_reported_up_front(folder_dataset):
    items = folder_dataset.train
    features = {items[0].key: torch.zeros(2, 5)}
    with pytest.raises(DatasetError) as err:
        ImageDataset(items, folder_dataset, build_transform(SIZE, train=False), semantic=features)
    message = str(err.value)
    assert "11 of 12 images" in message and items[1].key in message and items[10].key in message
    assert items[11].key not in message and "..." in message  # only the first ten are listed
    assert "python -m mugcp.extract --config" in message


# ---- loader determinism ----------------------------------------------------------------------

def _run_epochs(loader, epochs):
    out = []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)
        out.append([(batch["keys"], batch["images"]) for batch in loader])
    return out


def _train_loader(dataset, seed, num_workers=0, batch_size=4):
    data = ImageDataset(dataset.train, dataset, build_transform(SIZE, train=True))
    return build_loader(data, batch_size=batch_size, train=True, seed=seed, num_workers=num_workers)


def _same(a, b):
    return all(ka == kb and torch.equal(ia, ib) for (ka, ia), (kb, ib) in zip(a, b)) and len(a) == len(b)


def test_loader_order_and_augmentation_depend_only_on_seed_and_epoch(folder_dataset):
    first = _run_epochs(_train_loader(folder_dataset, seed=1), 2)
    torch.manual_seed(12345)  # the global RNG must not matter
    again = _run_epochs(_train_loader(folder_dataset, seed=1), 2)
    other = _run_epochs(_train_loader(folder_dataset, seed=2), 2)
    assert all(_same(a, b) for a, b in zip(first, again))
    assert [keys for keys, _ in first[0]] != [keys for keys, _ in first[1]]  # a new order every epoch
    assert [keys for keys, _ in first[0]] != [keys for keys, _ in other[0]]
    assert sorted(k for keys, _ in first[0] for k in keys) == sorted(item.key for item in folder_dataset.train)


def test_loader_resumes_mid_epoch(folder_dataset):
    full = _run_epochs(_train_loader(folder_dataset, seed=3, batch_size=2), 2)[1]
    loader = _train_loader(folder_dataset, seed=3, batch_size=2)
    set_loader_epoch(loader, 1, start_batch=2)
    assert len(loader) == len(full) - 2
    assert _same([(b["keys"], b["images"]) for b in loader], full[2:])


def test_loader_advances_epoch_by_itself(folder_dataset):
    explicit = _run_epochs(_train_loader(folder_dataset, seed=4), 2)
    loader = _train_loader(folder_dataset, seed=4)
    implicit = [[(b["keys"], b["images"]) for b in loader] for _ in range(2)]
    assert all(_same(a, b) for a, b in zip(explicit, implicit))


def test_loader_leaves_the_global_rng_alone(folder_dataset):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    _run_epochs(_train_loader(folder_dataset, seed=1), 1)
    assert torch.equal(state, torch.get_rng_state())


def test_loader_with_workers_matches_single_process(folder_dataset):
    single = _run_epochs(_train_loader(folder_dataset, seed=5), 1)
    workers = _run_epochs(_train_loader(folder_dataset, seed=5, num_workers=2), 1)
    assert _same(single[0], workers[0])


def test_train_drops_last_partial_batch_eval_keeps_order(folder_dataset):
    train = _train_loader(folder_dataset, seed=0, batch_size=5)
    assert len(train) == 2 and [len(b["keys"]) for b in train] == [5, 5]  # 12 images, last 2 dropped
    data = ImageDataset(folder_dataset.test, folder_dataset, build_transform(SIZE, train=False))
    batches = list(build_loader(data, batch_size=4, train=False, seed=0))
    assert [b["keys"] for b in batches] == [[i.key for i in folder_dataset.test[:4]],
                                            [i.key for i in folder_dataset.test[4:]]]
