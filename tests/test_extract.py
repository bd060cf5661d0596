"""End-to-end extraction with a tiny random LLaVA loaded from a local directory (the real loading code)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mugcp.extract import main
from mugcp.semantics import CacheMismatchError, SemanticCache, read_manifest
from mugcp.semantics.cache_manifest import SHARD_DIR, CacheError
from mugcp.semantics.cache_writer import scan_shards
from mugcp.semantics.extraction import dry_run, extract
from mugcp.semantics.extraction_setup import ExtractionError, ExtractionSettings
from mugcp.semantics.mllm import DEFAULT_PROMPT, MLLM
from mugcp.semantics.sources import image_dir_source
from tests.fixtures import make_imagefolder, write_corrupt_image, write_truncated_image
from tests.tiny_mllm import (
    TINY_TEXT_HIDDEN,
    TINY_TEXT_LAYERS,
    build_tiny_mllm,
    one_thread,  # noqa: F401  (autouse fixture)
)

MAX_NEW = 8
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_mllm(tmp_path_factory) -> Path:
    return build_tiny_mllm(tmp_path_factory.mktemp("tiny_mllm"))


def write_images(root: Path, count: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (18 + i, 24 - i, 3), dtype=np.uint8)
        path = root / ("cats" if i % 2 else "dogs") / f"img_{i}.{'png' if i % 3 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


def settings(mllm: Path, out: Path, **changes) -> ExtractionSettings:
    base = dict(mllm=str(mllm), out=out, max_new_tokens=MAX_NEW, batch_size=3, progress=False, device="cpu")
    return ExtractionSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def reference_run(tiny_mllm, image_dir, tmp_path_factory):
    """One full run at batch size 3, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    summary = extract(image_dir_source(image_dir), settings(tiny_mllm, out))
    return out, summary


@pytest.fixture(scope="module")
def batch1_run(tiny_mllm, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch1") / "cache"
    extract(image_dir_source(image_dir), settings(tiny_mllm, out, batch_size=1))
    return out


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / SHARD_DIR).iterdir())


def assert_same_entries(a: SemanticCache, b: SemanticCache, atol: float = 0.0) -> None:
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert a.text(key) == b.text(key), key
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=0), key


def test_extraction_stores_one_entry_per_image(reference_run, image_dir, tiny_mllm):
    out, summary = reference_run
    keys = image_dir_source(image_dir).keys
    assert keys == [f"cats/img_{i}.{'png' if i % 3 else 'jpg'}" for i in (1, 3, 5)] + [
        f"dogs/img_{i}.{'png' if i % 3 else 'jpg'}" for i in (0, 2, 4)
    ]
    assert (summary.requested, summary.already_stored, summary.extracted, summary.failed) == (6, 0, 6, {})

    cache = SemanticCache(out)
    assert sorted(cache.keys()) == keys and cache.dim == TINY_TEXT_HIDDEN
    lengths = []
    for key in keys:
        rows = cache[key]
        assert rows.dtype == torch.float16 and rows.dim() == 2 and rows.shape[1] == TINY_TEXT_HIDDEN
        assert 1 <= rows.shape[0] <= MAX_NEW and torch.isfinite(rows).all()
        assert isinstance(cache.text(key), str)
        lengths.append(rows.shape[0])
    assert len(set(lengths)) > 1, "the tiny model should give answers of different lengths"
    assert len({cache.text(key) for key in keys}) > 1, "answers should depend on the image"

    manifest = read_manifest(out)
    assert manifest["mllm"] == str(tiny_mllm.resolve()) and manifest["mllm_revision"] is None
    assert manifest["prompt"] == DEFAULT_PROMPT and manifest["layer"] == TINY_TEXT_LAYERS
    assert manifest["max_new_tokens"] == MAX_NEW and manifest["dtype"] == "float32"
    assert manifest["dataset"] == {"name": f"images:{image_dir.name}", "root": str(image_dir.resolve())}
    assert manifest["entries"] == 6 and manifest["tokens"] == sum(lengths) and manifest["failed"] == {}
    assert "entries" in summary.describe(out) and "extracted 6 images" in summary.describe(out)


def teacher_forced_states(tiny_mllm: Path, image: Image.Image, layer: int) -> tuple[torch.Tensor, str]:
    """Reference: greedy tokens from a plain generate, then one forward pass over prompt + answer."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_mllm)
    model = AutoModelForImageTextToText.from_pretrained(tiny_mllm, dtype=torch.float32).eval()
    conversation = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": DEFAULT_PROMPT}]}]]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        sequence = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        answer = sequence[0, prompt_len:].tolist()
        eos = processor.tokenizer.eos_token_id
        answer = answer[: answer.index(eos) + 1] if eos in answer else answer
        full = torch.tensor([inputs["input_ids"][0].tolist() + answer])
        outputs = model(input_ids=full, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(full),
                        output_hidden_states=True)
    # The state that predicts answer token t sits at position prompt_len - 1 + t.
    states = outputs.hidden_states[layer][0, prompt_len - 1: prompt_len - 1 + len(answer)]
    return states, processor.tokenizer.decode(answer, skip_special_tokens=True).strip()


@pytest.mark.parametrize("layer", [-1, 1])
def test_hidden_states_are_the_answer_tokens_states(tiny_mllm, image_dir, tmp_path, reference_run, layer):
    if layer == -1:
        cache = SemanticCache(reference_run[0])
    else:
        extract(image_dir_source(image_dir), settings(tiny_mllm, tmp_path / "c", layer=layer))
        cache = SemanticCache(tmp_path / "c")
        assert cache.manifest["layer"] == layer
    for key in ("cats/img_1.png", "dogs/img_0.jpg"):
        with Image.open(image_dir / key) as image:
            expected, text = teacher_forced_states(tiny_mllm, image.convert("RGB"), layer)
        assert cache[key].shape == expected.shape
        assert torch.allclose(cache[key].float(), expected.half().float(), atol=2e-2, rtol=1e-2)
        assert cache.text(key) == text


def test_batch_size_and_padding_do_not_change_results(reference_run, batch1_run):
    assert_same_entries(SemanticCache(reference_run[0]), SemanticCache(batch1_run), atol=1e-2)


def test_rerun_extracts_nothing(reference_run, tiny_mllm, image_dir, monkeypatch):
    out, first = reference_run
    before = shard_files(out)

    def must_not_load(*args, **kwargs):
        raise AssertionError("nothing is pending, so the model must not be loaded")

    monkeypatch.setattr(MLLM, "__init__", must_not_load)
    summary = extract(image_dir_source(image_dir), settings(tiny_mllm, out))
    assert (summary.extracted, summary.already_stored) == (0, 6)
    assert shard_files(out) == before
    assert summary.manifest["content_hash"] == first.manifest["content_hash"]


def test_interrupted_run_resumes_and_loses_only_the_batch_in_flight(tiny_mllm, image_dir, tmp_path, monkeypatch,
                                                                    reference_run):
    real_describe = MLLM.describe
    calls = []

    def dies_on_second_batch(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_describe(self, images)

    monkeypatch.setattr(MLLM, "describe", dies_on_second_batch)
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        extract(image_dir_source(image_dir), settings(tiny_mllm, out))
    keys = image_dir_source(image_dir).keys
    assert sorted(scan_shards(out)) == keys[:3]  # the first batch is durable, the second is lost
    with pytest.raises(CacheError, match="has shards but no index.json"):
        SemanticCache(out)

    monkeypatch.setattr(MLLM, "describe", real_describe)
    summary = extract(image_dir_source(image_dir), settings(tiny_mllm, out))
    assert (summary.extracted, summary.already_stored) == (3, 3)
    # Same batches as the uninterrupted run, so the same bytes.
    assert summary.manifest["content_hash"] == reference_run[1].manifest["content_hash"]


def test_other_prompt_or_layer_is_refused(reference_run, tiny_mllm, image_dir):
    out, _ = reference_run
    before = shard_files(out)
    with pytest.raises(CacheMismatchError) as info:
        extract(image_dir_source(image_dir), settings(tiny_mllm, out, prompt="What is this?", layer=1))
    message = str(info.value)
    assert f"the semantic cache at {out} was made with different settings, refusing to mix entries" in message
    assert "prompt: cache has" in message and "requested 'What is this?'" in message
    assert f"layer: cache has {TINY_TEXT_LAYERS}, requested 1" in message
    assert "pass a new --out directory" in message
    with pytest.raises(CacheMismatchError, match="max_new_tokens: cache has 8, requested 4"):
        extract(image_dir_source(image_dir), settings(tiny_mllm, out, max_new_tokens=4))
    assert shard_files(out) == before


def test_unreadable_images_are_named_recorded_and_skipped(tiny_mllm, image_dir, tmp_path, capsys):
    images = write_images(tmp_path / "images", count=3)
    write_corrupt_image(images / "dogs" / "broken.jpg")
    write_truncated_image(images / "cats" / "half.jpg")
    out = tmp_path / "cache"
    code = main(["--mllm", str(tiny_mllm), "--images", str(images), "--out", str(out), "--device", "cpu",
                 "--max-new-tokens", str(MAX_NEW), "--batch-size", "2", "--no-progress"])
    assert code == 0
    report = capsys.readouterr()
    assert "extracted 3 images" in report.out and "2 failed" in report.out
    assert "failed: dogs/broken.jpg: " in report.out and "failed: cats/half.jpg: " in report.out
    assert "skipping unreadable image" in report.err
    manifest = read_manifest(out)
    assert sorted(manifest["failed"]) == ["cats/half.jpg", "dogs/broken.jpg"]
    assert str(images / "dogs" / "broken.jpg") in manifest["failed"]["dogs/broken.jpg"]
    cache = SemanticCache(out)
    assert len(cache) == 3 and "dogs/broken.jpg" not in cache
    with pytest.raises(KeyError, match="could not read this image"):
        cache["dogs/broken.jpg"]


def test_out_of_memory_halves_the_batch(tiny_mllm, image_dir, tmp_path, monkeypatch, batch1_run):
    real_describe = MLLM.describe
    sizes = []

    def only_single_images_fit(self, images):
        sizes.append(len(images))
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (injected)")
        return real_describe(self, images)

    monkeypatch.setattr(MLLM, "describe", only_single_images_fit)
    summary = extract(image_dir_source(image_dir), settings(tiny_mllm, tmp_path / "c", batch_size=4))
    assert summary.extracted == 6 and summary.final_batch_size == 1
    # First chunk of 4 -> 2 + 2 -> 1 + 1 + 1 + 1; the prefetched chunk (2 left) -> 1 + 1.
    assert sizes == [4, 2, 1, 1, 2, 1, 1, 2, 1, 1]
    assert_same_entries(SemanticCache(tmp_path / "c"), SemanticCache(batch1_run))


def test_out_of_memory_on_one_image_stops_with_advice(tiny_mllm, image_dir, tmp_path, monkeypatch):
    def never_fits(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(MLLM, "describe", never_fits)
    with pytest.raises(ExtractionError, match=r"out of memory on a single image \(cats/img_1.png\).*--max-new-tokens"):
        extract(image_dir_source(image_dir), settings(tiny_mllm, tmp_path / "c", batch_size=2))


def test_other_errors_are_not_mistaken_for_out_of_memory(tiny_mllm, image_dir, tmp_path, monkeypatch):
    def broken(self, images):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(MLLM, "describe", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        extract(image_dir_source(image_dir), settings(tiny_mllm, tmp_path / "c"))


def test_dry_run_counts_and_estimates_without_writing(tiny_mllm, image_dir, tmp_path, reference_run, capsys):
    fresh = dry_run(image_dir_source(image_dir), settings(tiny_mllm, tmp_path / "none"))
    assert (fresh.requested, fresh.already_stored, fresh.pending) == (6, 0, 6)
    assert fresh.upper_bound_bytes == 6 * MAX_NEW * TINY_TEXT_HIDDEN * 2 and fresh.mean_tokens is None
    assert not (tmp_path / "none").exists()

    more = write_images(tmp_path / image_dir.name, count=8)  # the 6 reference images plus 2 new ones
    done = dry_run(image_dir_source(more), settings(tiny_mllm, reference_run[0]))
    assert (done.requested, done.already_stored, done.pending) == (8, 6, 2)
    assert done.mean_tokens == reference_run[1].manifest["tokens"] / 6

    code = main(["--mllm", str(tiny_mllm), "--images", str(more), "--out", str(reference_run[0]),
                 "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--dry-run"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "images: 8 requested, 6 already stored, 2 to extract" in printed
    assert f"d_m={TINY_TEXT_HIDDEN}, 64 bytes per answer token" in printed
    assert "upper bound (every answer 8 tokens): 1.0 KiB" in printed


def test_cli_errors_exit_2_with_a_message(tiny_mllm, image_dir, tmp_path, capsys, reference_run):
    assert main(["--mllm", str(tmp_path / "no_model"), "--images", str(image_dir), "--out", str(tmp_path / "c")]) == 2
    assert "Offline loading needs a local directory" in capsys.readouterr().err

    empty_model = tmp_path / "empty_model"
    empty_model.mkdir()
    assert main(["--mllm", str(empty_model), "--images", str(image_dir), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"could not load the MLLM '{empty_model}'" in err and "Offline loading needs a local directory" in err

    assert main(["--mllm", str(tiny_mllm), "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "--images " in capsys.readouterr().err

    assert main(["--mllm", str(tiny_mllm), "--images", str(image_dir), "--out", str(reference_run[0]),
                 "--max-new-tokens", str(MAX_NEW), "--layer", "0", "--device", "cpu"]) == 2
    assert "layer: cache has 2, requested 0" in capsys.readouterr().err

    assert main(["--mllm", str(tiny_mllm), "--images", str(image_dir), "--out", str(tmp_path / "c"),
                 "--layer", "7"]) == 2
    assert "--layer 7 is out of range" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["--mllm", str(tiny_mllm), "--out", str(tmp_path / "c")])
    assert "give exactly one of --images DIR" in capsys.readouterr().err


def test_merge_command_indexes_an_interrupted_run(reference_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference_run[0], out)
    (out / "index.json").unlink()
    (out / "texts.jsonl").unlink()
    assert main(["--merge", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"merged {out}: 6 entries in 1 shards, 0 failed, sha256:" in printed
    assert_same_entries(SemanticCache(out), SemanticCache(reference_run[0]))


def test_dataset_source_all_splits_or_some(tiny_mllm, tmp_path, capsys):
    from mugcp.data import build_dataset

    root = make_imagefolder(tmp_path, per_class=2, splits=("train", "val", "test"))
    out = tmp_path / "cache"
    common = ["--mllm", str(tiny_mllm), "--max-new-tokens", "4", "--batch-size", "4", "--no-progress",
              "--device", "cpu", "--out", str(out)]
    assert main(["--dataset", "imagefolder", "--root", str(root), "--splits", "test", *common]) == 0
    dataset = build_dataset({"dataset": "imagefolder", "root": str(root)})
    test_keys = sorted(item.key for item in dataset.test)
    assert sorted(SemanticCache(out).keys()) == test_keys and len(test_keys) == 6
    assert read_manifest(out)["dataset"]["splits"] == ["test"]

    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  dataset: imagefolder\n  root: {root}\n")
    assert main(["--config", str(config), *common]) == 0
    all_keys = sorted({item.key for split in ("train", "val", "test") for item in dataset.split(split)})
    cache = SemanticCache(out)
    assert sorted(cache.keys()) == all_keys and len(all_keys) == 18
    assert cache.manifest["dataset"]["name"] == "imagefolder"
    assert cache.manifest["dataset"]["splits"] == ["test", "train", "val"]
    assert "12 images" in capsys.readouterr().out.split("extracted ")[-1]


@pytest.mark.slow  # two fresh Python processes importing torch + transformers: ~35 s on 2 busy cores
def test_two_process_gloo_run_matches_one_process(tiny_mllm, image_dir, tmp_path, batch1_run):
    out = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "mugcp.extract", "--mllm", str(tiny_mllm), "--images", str(image_dir), "--out", str(out),
               "--max-new-tokens", str(MAX_NEW), "--batch-size", "1", "--device", "cpu", "--no-progress"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("extracted 6 images") == 1  # only rank 0 reports
    ranks = {name.split("-")[2] for name in shard_files(out)}
    assert ranks == {"r00000", "r00001"}
    per_rank = {rank: sorted(key for key, e in scan_shards(out).items() if rank in e.shard) for rank in ranks}
    keys = image_dir_source(image_dir).keys
    assert per_rank == {"r00000": keys[0::2], "r00001": keys[1::2]}  # disjoint shares
    assert_same_entries(SemanticCache(out), SemanticCache(batch1_run), atol=1e-2)
    assert json.loads((out / "index.json").read_text())["dim"] == TINY_TEXT_HIDDEN


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_in_reduced_precision(tiny_mllm, image_dir, tmp_path):
    summary = extract(image_dir_source(image_dir), settings(tiny_mllm, tmp_path / "c", device="auto"))
    cache = SemanticCache(tmp_path / "c")
    assert summary.extracted == 6 and len(cache) == 6
    assert cache.manifest["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    for key in cache.keys():
        rows = cache[key]
        assert rows.dtype == torch.float16 and rows.shape[1] == TINY_TEXT_HIDDEN and torch.isfinite(rows).all()


def test_values_are_checked_before_anything_is_loaded(tmp_path, image_dir, capsys):
    """No MLLM exists at --mllm: a bad value must be reported before it is looked for."""
    missing_model = str(tmp_path / "no_model")
    assert main(["--mllm", missing_model, "--images", str(image_dir),
                 "--out", str(tmp_path / "c"), "--batch-size", "0"]) == 2
    assert "--batch-size=0 is not allowed: expected an integer >= 1" in capsys.readouterr().err

    assert main(["--mllm", missing_model, "--images", str(image_dir),
                 "--out", str(tmp_path / "c"), "--max-new-tokens", "-2"]) == 2
    assert "--max-new-tokens=-2 is not allowed" in capsys.readouterr().err

    # Config values go through the schema that train and evaluate use, before the dataset is read.
    assert main(["--mllm", missing_model, "--dataset", "imagefolder", "--root", str(image_dir),
                 "--out", str(tmp_path / "c"), "data.image_size=-3"]) == 2
    assert "data.image_size=-3 is not allowed" in capsys.readouterr().err
    assert main(["--mllm", missing_model, "--dataset", "imagefolder", "--root", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "data.root=" in err and "does not exist" in err
    assert not (tmp_path / "c").exists()
