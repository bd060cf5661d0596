"""The semantic cache format: writer, merge, crash leftovers, and the reader's contents and errors."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from mugcp.semantics import (
    CacheError,
    CacheMismatchError,
    CacheWriter,
    SemanticCache,
    merge_cache,
    read_manifest,
    write_cache,
)
from mugcp.semantics.cache_manifest import SHARD_DIR, new_manifest, write_manifest
from mugcp.semantics.cache_writer import _entry_digest, _write_shard, scan_shards

IDENTITY = {"mllm": "tiny", "prompt": "describe it", "layer": 2, "max_new_tokens": 8, "dtype": "float32",
            "dataset": {"name": "toy"}}


def entries(count: int, dim: int = 6, seed: int = 0) -> dict[str, tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"class_{i % 3}/img_{i}.jpg": (f"answer number {i}", torch.randn(1 + i % 4, dim, generator=generator))
        for i in range(count)
    }


def test_round_trip_shapes_dtype_texts_and_manifest(tmp_path):
    data = entries(7)
    manifest = write_cache(tmp_path / "c", data, manifest_extra=IDENTITY)
    cache = SemanticCache(tmp_path / "c")

    assert len(cache) == 7 and cache.dim == 6
    assert sorted(cache.keys()) == sorted(data)
    for key, (text, hidden) in data.items():
        assert key in cache
        rows = cache[key]
        assert rows.dtype == torch.float16 and rows.shape == hidden.shape
        assert torch.equal(rows, hidden.half())
        assert cache.text(key) == text
        assert cache.num_tokens(key) == hidden.shape[0]
    assert "missing.jpg" not in cache
    assert cache.manifest == manifest == read_manifest(tmp_path / "c")
    assert manifest["entries"] == 7 and manifest["hidden_dim"] == 6
    assert manifest["tokens"] == sum(h.shape[0] for _, h in data.values())
    assert manifest["mllm"] == "tiny" and manifest["layer"] == 2 and manifest["dataset"] == {"name": "toy"}
    assert manifest["hidden_dtype"] == "float16" and manifest["failed"] == {}

    lines = (tmp_path / "c" / "texts.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["key"] for r in records] == sorted(data)
    assert all(r["text"] == data[r["key"]][0] and r["tokens"] == data[r["key"]][1].shape[0] for r in records)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert set(index["entries"]) == set(data) and index["dim"] == 6


def test_unicode_text_and_keys_survive(tmp_path):
    write_cache(tmp_path, {"dossier/été.png": ("un chat roux, très poilu ✓", torch.ones(2, 3))}, IDENTITY)
    cache = SemanticCache(tmp_path)
    assert cache.text("dossier/été.png") == "un chat roux, très poilu ✓"


def test_writer_folds_parts_into_one_shard_and_adds_to_existing_cache(tmp_path):
    write_manifest(tmp_path, new_manifest(IDENTITY, {"dataset": {"name": "toy"}}))
    data = entries(10)
    with CacheWriter(tmp_path, shard_entries=4) as writer:
        for i, (key, (text, hidden)) in enumerate(data.items()):
            writer.add(key, text, hidden)
            if i % 2 == 1:
                writer.flush()
    shards = sorted(p.name for p in (tmp_path / SHARD_DIR).iterdir())
    # 5 parts of 2 entries; folds at 4 entries (parts 1-2, 3-4) and on close (part 5 stays as it is).
    assert len(shards) == 3
    assert sum("-s" in name for name in shards) == 2
    merge_cache(tmp_path)
    assert len(SemanticCache(tmp_path)) == 10

    more = entries(3, seed=1)
    more = {f"extra/{k}": v for k, v in more.items()}
    write_cache(tmp_path, more, manifest_extra=IDENTITY)
    cache = SemanticCache(tmp_path)
    assert len(cache) == 13 and torch.equal(cache[next(iter(more))], next(iter(more.values()))[1].half())


def test_crash_between_fold_and_part_deletion_leaves_no_duplicates(tmp_path):
    write_manifest(tmp_path, new_manifest(IDENTITY))
    data = entries(4)
    rows = [(k, t, h.half(), _entry_digest(h.half())) for k, (t, h) in data.items()]
    shard_dir = tmp_path / SHARD_DIR
    _write_shard(shard_dir / "run-r00000-p000001.safetensors", rows[:2], replaces=[])
    _write_shard(shard_dir / "run-r00000-p000002.safetensors", rows[2:], replaces=[])
    # The fold was written, then the process died before deleting the two parts.
    _write_shard(shard_dir / "run-r00000-s000003.safetensors", rows,
                 replaces=["run-r00000-p000001.safetensors", "run-r00000-p000002.safetensors"])
    stored = scan_shards(tmp_path)
    assert set(stored) == set(data) and {e.shard for e in stored.values()} == {"run-r00000-s000003.safetensors"}
    manifest = merge_cache(tmp_path)
    assert manifest["entries"] == 4 and manifest["shards"] == 1
    assert sorted(p.name for p in shard_dir.iterdir()) == ["run-r00000-s000003.safetensors"]


def test_content_hash_depends_on_content_not_on_shard_layout(tmp_path):
    data = entries(6)
    one = write_cache(tmp_path / "one", data, IDENTITY)
    write_manifest(tmp_path / "two", new_manifest(IDENTITY))
    for rank, keys in enumerate((list(data)[::2], list(data)[1::2])):
        with CacheWriter(tmp_path / "two", rank=rank) as writer:
            for key in keys:
                writer.add(key, *data[key])
                writer.flush()
    two = merge_cache(tmp_path / "two")
    assert two["shards"] == 2 and one["content_hash"] == two["content_hash"]

    changed = dict(data)
    key = next(iter(changed))
    changed[key] = (changed[key][0], changed[key][1] + 1)
    three = write_cache(tmp_path / "three", changed, IDENTITY)
    assert three["content_hash"] != one["content_hash"]


def test_failures_are_recorded_until_the_key_is_stored(tmp_path):
    write_manifest(tmp_path, new_manifest(IDENTITY))
    with CacheWriter(tmp_path, rank=1) as writer:
        writer.add("good.jpg", "fine", torch.ones(1, 2))
        writer.add_failure("bad.jpg", "truncated file")
    assert merge_cache(tmp_path)["failed"] == {"bad.jpg": "truncated file"}
    with pytest.raises(KeyError, match=r"'bad.jpg': the extraction could not read this image \(truncated file\)"):
        SemanticCache(tmp_path)["bad.jpg"]
    write_cache(tmp_path, {"bad.jpg": ("fixed", torch.ones(1, 2))}, IDENTITY)
    assert read_manifest(tmp_path)["failed"] == {}


def test_missing_key_error_names_the_key_and_the_extract_command(tmp_path):
    write_cache(tmp_path, entries(2), IDENTITY)
    cache = SemanticCache(tmp_path)
    with pytest.raises(KeyError) as info:
        cache["class_0/not_there.jpg"]
    message = str(info.value)
    assert message.startswith("'class_0/not_there.jpg' is not in the semantic cache")
    assert "python -m mugcp.extract --mllm MODEL_DIR" in message and f"--out {tmp_path}" in message
    with pytest.raises(KeyError, match="not_there"):
        cache.text("class_0/not_there.jpg")


def test_reader_errors_say_how_to_fix(tmp_path):
    with pytest.raises(CacheError, match=r"does not exist\. Create it with `python -m mugcp.extract"):
        SemanticCache(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="has no manifest.json, so it is not a semantic cache"):
        SemanticCache(tmp_path / "empty")

    write_manifest(tmp_path / "fresh", new_manifest(IDENTITY))
    with pytest.raises(CacheError, match="holds no entries yet"):
        SemanticCache(tmp_path / "fresh")
    with CacheWriter(tmp_path / "fresh") as writer:
        writer.add("a.jpg", "x", torch.ones(1, 2))
    with pytest.raises(CacheError, match=r"has shards but no index.json .*--merge --out"):
        SemanticCache(tmp_path / "fresh")
    merge_cache(tmp_path / "fresh")
    assert SemanticCache(tmp_path / "fresh")["a.jpg"].shape == (1, 2)

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json: not valid JSON"):
        SemanticCache(tmp_path / "bad")


def test_writer_rejects_bad_entries(tmp_path):
    writer = CacheWriter(tmp_path)
    with pytest.raises(CacheError, match=r"'a' must be a 2-D tensor \(tokens, d_m\), got \(4,\)"):
        writer.add("a", "t", torch.ones(4))
    with pytest.raises(CacheError, match="'a' have 0 rows"):
        writer.add("a", "t", torch.ones(0, 4))
    with pytest.raises(CacheError, match="not finite in torch.float16"):
        writer.add("a", "t", torch.full((1, 4), 1e6))
    writer.add("a", "t", torch.ones(2, 4))
    with pytest.raises(CacheError, match="'b' have width 3, the cache stores d_m=4"):
        writer.add("b", "t", torch.ones(2, 3))
    with pytest.raises(CacheError, match="key 'a' was added twice"):
        writer.add("a", "t", torch.ones(2, 4))
    with pytest.raises(CacheError, match="non-empty strings"):
        writer.add("", "t", torch.ones(2, 4))


def test_write_cache_refuses_other_settings_and_stored_keys(tmp_path):
    data = entries(2)
    write_cache(tmp_path, data, IDENTITY)
    with pytest.raises(CacheMismatchError) as info:
        write_cache(tmp_path, {"new.jpg": ("t", torch.ones(1, 6))}, {**IDENTITY, "prompt": "other", "layer": 1})
    message = str(info.value)
    assert "refusing to mix entries" in message
    assert "prompt: cache has 'describe it', requested 'other'" in message
    assert "layer: cache has 2, requested 1" in message and "mllm" not in message
    with pytest.raises(CacheMismatchError, match="dataset: cache has 'toy', requested 'dtd'"):
        write_cache(tmp_path, {"new.jpg": ("t", torch.ones(1, 6))}, {**IDENTITY, "dataset": {"name": "dtd"}})
    with pytest.raises(CacheError, match="keys already stored"):
        write_cache(tmp_path, {next(iter(data)): ("t", torch.ones(1, 6))}, IDENTITY)


def test_reader_pickles_and_works_in_dataloader_workers(tmp_path):
    data = entries(6)
    write_cache(tmp_path, data, IDENTITY)
    cache = SemanticCache(tmp_path)
    cache["class_0/img_0.jpg"]  # opens a shard handle in this process first
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone["class_1/img_1.jpg"], data["class_1/img_1.jpg"][1].half())

    keys = sorted(data)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(keys)

        def __getitem__(self, i):
            return cache[keys[i]].float().sum()

    loader = torch.utils.data.DataLoader(Rows(), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    sums = torch.cat(list(loader))
    expected = torch.stack([data[k][1].half().float().sum() for k in keys])
    assert torch.allclose(sums, expected)


def test_foreign_file_in_shard_dir_is_named(tmp_path):
    write_cache(tmp_path, entries(1), IDENTITY)
    (tmp_path / SHARD_DIR / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(CacheError, match=r"junk.safetensors: not a readable safetensors shard"):
        merge_cache(tmp_path)


def test_merge_without_manifest_is_refused(tmp_path):
    with pytest.raises(CacheError, match="no manifest.json; this is not a semantic cache"):
        merge_cache(tmp_path)


def test_shards_are_named_per_rank_and_unique_per_run(tmp_path):
    write_manifest(tmp_path, new_manifest(IDENTITY))
    names = set()
    for _ in range(2):
        with CacheWriter(tmp_path, rank=3) as writer:
            writer.add(f"k{len(names)}", "t", torch.ones(1, 2))
        names = {p.name for p in (tmp_path / SHARD_DIR).iterdir()}
    assert len(names) == 2 and all("-r00003-" in name for name in names)
