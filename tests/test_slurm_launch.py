"""``--launcher slurm`` of mugcp.extract and mugcp.train: the task command lines, no Slurm here, and a
2-shard extraction on the private Slurm cluster (tests/slurm_cluster.py) against one process."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mugcp.cli import run_cli
from mugcp.extract import build_parser
from mugcp.extract import main as extract_main
from mugcp.launch.slurm_launch import task_arguments
from mugcp.semantics import SemanticCache, read_manifest
from mugcp.semantics.cache_manifest import SHARD_DIR
from mugcp.train import main as train_main
from tests.test_extract import assert_same_entries
from tests.test_extract_shards import command, image_dir, single_process, tiny_mllm  # noqa: F401  (fixtures)
from tests.tiny_mllm import one_thread  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 300


def test_tasks_run_the_typed_command_without_the_launchers_options():
    parser = build_parser()
    typed = ["--mllm", "m", "--images=imgs", "--launcher", "slurm", "--shards", "4", "--slurm-part", "gpu",
             "--layer", "-1", "--slurm-setup", "module load cuda", "--slurm-setup=source env", "--wait", "--out", "c",
             "data.root=/x"]
    # Abbreviations as argparse reads them; a value that looks like an option (-1) stays with its flag.
    assert task_arguments(typed, parser, drop=("shards", "shard")) == [
        "--mllm", "m", "--images=imgs", "--layer", "-1", "--out", "c", "data.root=/x"]


@pytest.mark.parametrize("hidden, reason", [("sbatch", "sbatch not found"),
                                            ("submitit", "submitit is not installed: pip install -e '.[slurm]'")])
def test_without_slurm_the_launcher_says_so_in_one_line(hidden, reason, monkeypatch, capsys, tmp_path):
    if hidden == "submitit":
        monkeypatch.setitem(__import__("sys").modules, "submitit", None)  # import submitit now raises ImportError
    else:
        real_which = shutil.which
        monkeypatch.setattr(shutil, "which",
                            lambda name, *a, **k: None if name == hidden else real_which(name, *a, **k))
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: train_main(["--output", str(tmp_path / "run"), "--launcher", "slurm",
                                    "--slurm-gpus-per-node", "1"]))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --launcher slurm: ") and reason in err
    assert extract_main(["--mllm", "m", "--images", str(tmp_path), "--out", str(tmp_path / "c"),
                         "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def shard_job(out: Path, index: int) -> str:
    from mugcp.launch.slurm_task import read_state

    return read_state(out / ".slurm" / f"shard-{index}-of-2")["job_id"]


@pytest.mark.slow  # each task imports torch + transformers: ~20-40 s on 2 busy cores
def test_two_shard_extraction_on_slurm_gives_the_single_process_cache(
    slurm_cluster, tiny_mllm, image_dir, single_process, tmp_path, monkeypatch, capsys  # noqa: F811
):
    from mugcp.launch.slurm import wait_for_jobs
    from mugcp.launch.slurm_task import read_state

    monkeypatch.chdir(ROOT)  # tasks run from here, so `python -m mugcp.extract` imports this checkout
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cache"
    slurm = ["--launcher", "slurm", "--shards", "2", "--slurm-time", "10"]
    assert extract_main(command(tiny_mllm, image_dir, out, *slurm)) == 0
    printed = capsys.readouterr().out
    array = shard_job(out, 0).split("_")[0]
    assert (shard_job(out, 0), shard_job(out, 1)) == (f"{array}_0", f"{array}_1")
    merge_job = read_state(out / ".slurm" / "merge")["job_id"]
    assert f"submitted shards 0, 1 of 2 as job {array} ({array}_0, {array}_1)" in printed
    assert f"the merge runs as job {merge_job} once they have ended" in printed

    # The merge job waits for both tasks (afterany), indexes the cache and checks it.
    folders = {shard_job(out, 0): out / ".slurm/shard-0-of-2", shard_job(out, 1): out / ".slurm/shard-1-of-2",
               merge_job: out / ".slurm/merge"}
    assert set(wait_for_jobs(folders, timeout_s=WAIT_S, poll_s=1).values()) == {"done"}
    assert f"{out} is complete: 6 of 6 images stored." in (out / ".slurm/merge" / f"slurm-{merge_job}.out").read_text()
    assert "shard 1 of 2: extracted 3 images" in (out / ".slurm/shard-1-of-2" / f"slurm-{array}_1.out").read_text()
    assert_same_entries(SemanticCache(out), SemanticCache(single_process))
    assert read_manifest(out)["content_hash"] == read_manifest(single_process)["content_hash"]

    # A task that lost its work: rerunning the command resubmits that shard alone; --wait merges here.
    for shard in (out / SHARD_DIR).glob("*-r00001-*"):
        shard.unlink()
    assert extract_main(command(tiny_mllm, image_dir, out, *slurm, "--wait")) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"submitted shard 1 of 2 as job {shard_job(out, 1)}\n") and "left alone" not in printed
    assert "shards: 1 done" in printed and f"{out} is complete: 6 of 6 images stored." in printed
    assert shard_job(out, 0) == f"{array}_0" and shard_job(out, 1) != f"{array}_1"
    assert_same_entries(SemanticCache(out), SemanticCache(single_process))


def test_failed_tasks_are_named_when_waiting(slurm_cluster, tmp_path, image_dir, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(ROOT)
    out = tmp_path / "cache"
    # The job script stops before the task starts: both tasks fail and write nothing.
    args = ["--mllm", str(tmp_path / "model"), "--images", str(image_dir), "--out", str(out), "--launcher", "slurm",
            "--shards", "2", "--slurm-time", "5", "--slurm-setup", "exit 3", "--wait"]
    assert extract_main(args) == 2
    err = capsys.readouterr().err
    array = shard_job(out, 0).split("_")[0]
    assert f"{out}: no manifest.json: no shard has written anything yet" in err
    for task in (f"{array}_0", f"{array}_1"):  # the task never started: submitit's own log of it
        assert f"job {task} failed (log: {out / '.slurm' / '.submitit' / task / f'{task}_0_log.err'})" in err
        assert (out / ".slurm" / ".submitit" / task / f"{task}_0_log.err").exists()
