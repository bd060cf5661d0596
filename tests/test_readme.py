"""The README's "From Python" blocks run exactly as written (random weights, a tiny trained run)."""
import re
from pathlib import Path

from fixtures import make_imagefolder, write_image
from test_engine import CLASSES, small_config

from mugcp.runs import run_setup
from mugcp.training import train

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("From Python, in the style of open_clip")
    section = text[start:].split("\n## ", 1)[0]  # to the end of "Using it"
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_the_two_python_blocks():
    blocks = python_blocks()
    assert len(blocks) == 2 and 'pretrained="none"' in blocks[0] and "mugcp.load_run(" in blocks[1]


def test_first_block_runs_as_written():
    namespace: dict = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)
    assert tuple(namespace["logits"].shape) == (4, 2) and tuple(namespace["feats"].shape) == (2, 512)


def test_trained_run_block_runs_as_written(tmp_path, vit_b32, monkeypatch, capsys):
    monkeypatch.setattr(run_setup, "load_clip", lambda *args, **kwargs: vit_b32)
    root = make_imagefolder(tmp_path / "data", CLASSES, per_class={"train": 4, "test": 2})
    train(small_config(root, "optim.epochs=1", "optim.max_steps=1", "data.max_eval_per_class=1"),
          tmp_path / "runs" / "coop_demo")
    write_image(tmp_path / "photos" / "cat.jpg", 1, 0, size=(40, 30))
    write_image(tmp_path / "photos" / "dog.png", 2, 1, size=(25, 35))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_blocks()[1], str(README), "exec"), namespace)
    assert tuple(namespace["logits"].shape) == (1, 3)
    best = namespace["best"]
    assert len(best) == 2 and best[1].path == "photos/dog.png"
    assert set(best[0].classes) <= {"cat", "dog", "owl"} and len(best[0].classes) == 2
    assert str(best[0].classes) in capsys.readouterr().out
