"""Small things a new user meets first: ``mugcp.data --help``, a file given as data.root, the epoch bar's counts."""
import pytest
from fixtures import make_imagefolder
from test_engine import CLASSES, small_config

from mugcp.cli import run_cli
from mugcp.data import DatasetError, build_dataset
from mugcp.data.__main__ import main as data_main
from mugcp.runs import run_setup
from mugcp.training import train


def test_data_help_exits_0_with_the_commands(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: data_main([flag]))  # what `python -m mugcp.data --help` runs
        captured = capsys.readouterr()
        assert exit_info.value.code == 0 and captured.err == ""
        assert captured.out.startswith("usage: python -m mugcp.data check --dataset NAME --root ROOT")
        assert "  check  a dataset's layout, split file and every image" in captured.out


@pytest.mark.parametrize("dataset, start", [
    ("imagefolder", "imagefolder: data.root {} is a file, not a folder. Expected layout: ROOT/train/"),
    ("dtd", "dataset 'dtd': data.root {} is a file, not a folder. Expected layout: "
            "ROOT/dtd/split_zhou_DescribableTextures.json"),
    ("fashion_mnist", "fashion_mnist: data.root {} is a file, not a folder. Expected layout: "
                      "ROOT/train-images-idx3-ubyte"),
])
def test_a_file_given_as_the_dataset_folder_is_called_a_file(tmp_path, dataset, start):
    readme = tmp_path / "README.md"
    readme.write_text("# not a dataset\n")
    with pytest.raises(DatasetError) as info:
        build_dataset({"dataset": dataset, "root": str(readme)})
    assert str(info.value).startswith(start.format(readme))
    with pytest.raises(DatasetError, match=f"data.root {tmp_path / 'nowhere'} does not exist"):
        build_dataset({"dataset": dataset, "root": str(tmp_path / "nowhere")})


def test_the_epoch_bar_counts_the_epochs_and_steps_that_run(tmp_path, vit_b32, monkeypatch, capsys):
    monkeypatch.setattr(run_setup, "load_clip", lambda *args, **kwargs: vit_b32)
    root = make_imagefolder(tmp_path, CLASSES, per_class={"train": 4, "test": 1})
    # 4 training images, batch 1: 4 steps an epoch; max_steps=2 ends training halfway through the first of 200 epochs.
    cfg = small_config(root, "data.batch_size=1", "optim.epochs=200", "optim.max_steps=2", "train.progress=true",
                       "data.max_eval_per_class=1")
    metrics = train(cfg, tmp_path / "run")
    assert metrics["steps"] == 2
    bars = capsys.readouterr().err
    assert "epoch 1/1: 100%" in bars and "| 2/2 [" in bars
    assert "/200" not in bars and "/4 [" not in bars
