"""Extraction in shards without a process group (what each Slurm array task runs), and the checked merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mugcp.extract import main
from mugcp.semantics import SemanticCache, read_manifest
from mugcp.semantics.cache_manifest import SHARD_DIR
from mugcp.semantics.cache_writer import scan_shards
from mugcp.semantics.extraction import extract
from mugcp.semantics.extraction_setup import ExtractionSettings
from mugcp.semantics.mllm import MLLM
from mugcp.semantics.sources import image_dir_source
from tests.test_extract import assert_same_entries, write_images
from tests.tiny_mllm import build_tiny_mllm, one_thread  # noqa: F401  (autouse fixture)

MAX_NEW = 8


@pytest.fixture(scope="module")
def tiny_mllm(tmp_path_factory) -> Path:
    return build_tiny_mllm(tmp_path_factory.mktemp("tiny_mllm"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def single_process(tiny_mllm, image_dir, tmp_path_factory) -> Path:
    """The cache one process makes, one image per batch (as the shard runs below)."""
    out = tmp_path_factory.mktemp("single") / "cache"
    extract(image_dir_source(image_dir), ExtractionSettings(mllm=str(tiny_mllm), out=out, max_new_tokens=MAX_NEW,
                                                            batch_size=1, progress=False, device="cpu"))
    return out


def command(tiny_mllm, image_dir, out, *extra) -> list[str]:
    return ["--mllm", str(tiny_mllm), "--images", str(image_dir), "--out", str(out), "--max-new-tokens", str(MAX_NEW),
            "--batch-size", "1", "--device", "cpu", "--no-progress", *extra]


def test_two_shards_then_the_checked_merge_give_the_single_process_cache(tiny_mllm, image_dir, tmp_path, single_process,
                                                                          capsys, monkeypatch):
    out = tmp_path / "cache"
    keys = image_dir_source(image_dir).keys
    assert main(command(tiny_mllm, image_dir, out, "--shard", "0", "--shards", "2")) == 0
    printed = capsys.readouterr().out
    assert "shard 0 of 2: extracted 3 images" in printed and "0 of 3 were already stored" in printed
    assert f"python -m mugcp.extract --merge --out {out} --shards 2" in printed
    # Shard 0 owns every second key of the sorted request, whatever the cache holds; no index yet.
    assert sorted(scan_shards(out)) == sorted(keys)[0::2]
    assert not (out / "index.json").exists()

    # Merged before shard 1 ran: indexed, but refused as incomplete, naming the missing images by shard.
    assert main(["--merge", "--out", str(out), "--images", str(image_dir), "--shards", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{out} is incomplete: 3 of 6 images are missing" in err
    assert f"shard 1 of 2: 3 missing ({', '.join(sorted(keys)[1::2])})" in err
    assert len(SemanticCache(out).keys()) == 3

    assert main(command(tiny_mllm, image_dir, out, "--shard", "1", "--shards", "2")) == 0
    assert "shard 1 of 2: extracted 3 images" in capsys.readouterr().out
    files = sorted(p.name for p in (out / SHARD_DIR).iterdir())
    assert {name.split("-")[2] for name in files} == {"r00000", "r00001"}  # each shard writes its own files

    # A shard run again has nothing left: the model is not even loaded.
    monkeypatch.setattr(MLLM, "__init__", lambda *a, **k: pytest.fail("nothing is pending in shard 0"))
    assert main(command(tiny_mllm, image_dir, out, "--shard", "0", "--shards", "2")) == 0
    assert "shard 0 of 2: extracted 0 images" in capsys.readouterr().out

    assert main(["--merge", "--out", str(out), "--images", str(image_dir), "--shards", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"{out} is complete: 6 of 6 images stored." in printed and "merged" in printed
    # Entries, texts and hidden rows as one process makes them (same batches, so the same numbers).
    assert_same_entries(SemanticCache(out), SemanticCache(single_process))
    assert read_manifest(out)["content_hash"] == read_manifest(single_process)["content_hash"]
    assert read_manifest(out)["dataset"] == read_manifest(single_process)["dataset"]
    assert json.loads((out / "index.json").read_text())["dim"] == SemanticCache(single_process).dim


def test_shard_arguments_are_checked(tiny_mllm, image_dir, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(command(tiny_mllm, image_dir, out, "--shard", "2", "--shards", "2")) == 2
    assert "--shard 2 is outside 0..1 (--shards 2)" in capsys.readouterr().err
    for extra, message in ((["--shard", "0"], "--shard I needs --shards N"),
                           (["--shards", "2"],
                            "--shards N runs N tasks with --launcher slurm, or this process's share"),
                           (["--launcher", "slurm", "--shard", "0", "--shards", "2"],
                            "--launcher slurm submits the whole")):
        with pytest.raises(SystemExit):
            main(command(tiny_mllm, image_dir, out, *extra))
        assert message in capsys.readouterr().err
    assert not out.exists()
