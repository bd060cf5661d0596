"""The library as a user installs it: a wheel, used from a folder outside the checkout, beside Hugging
Face's ``kernels`` package (a transformers dependency that owns that import name).

The wheel is built from the checkout and installed without dependencies into a fresh virtual
environment that sees this environment's packages (a path entry, so the checkout's editable install
is not active there). Every command then runs from a temporary folder: what the user meets is what
the wheel holds, never the checkout's files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from fixtures import make_imagefolder
from released_reference import TINY_CLIP, TINY_CONFIG
from tiny_mllm import build_tiny_mllm

from mugcp.sweeps import load_sweep

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(python of a fresh venv holding only the wheel, a working folder outside the checkout)."""
    base = tmp_path_factory.mktemp("install")
    wheels = base / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=300, cwd=base)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    wheel = next(wheels.glob("mugcp-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    # This environment's packages, after the venv's own (a plain path line: the editable install's hooks stay off).
    (site / "zz_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = base / "elsewhere"
    work.mkdir()
    return python, work


def run(python: Path, work: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([str(python), *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_is_imported_and_kernels_is_hugging_faces(installed):
    python, work = installed
    probe = run(python, work, "-c", textwrap.dedent("""
        import json, kernels, mugcp, mugcp.kernels, mugcp.methods
        from mugcp.config import CONFIG_DIR
        print(json.dumps({"mugcp": mugcp.__file__, "kernels": kernels.__file__, "ours": mugcp.kernels.__file__,
                          "configs": str(CONFIG_DIR), "hf": hasattr(kernels, "get_kernel")}))
    """))
    assert probe.returncode == 0, probe.stderr
    where = {key: value if isinstance(value, bool) else Path(value)
             for key, value in json.loads(probe.stdout.strip().splitlines()[-1]).items()}
    site = Path(sysconfig.get_paths()["purelib"])  # this environment's packages
    assert where["hf"] and where["kernels"] == site / "kernels" / "__init__.py"
    installed_package = where["mugcp"].parent
    assert installed_package.parent != site and installed_package != ROOT / "mugcp"
    assert where["ours"] == installed_package / "kernels" / "__init__.py"
    assert where["configs"] == installed_package / "configs" and (where["configs"] / "demo.yaml").is_file()


def test_create_model_works_from_the_wheel(installed):
    python, work = installed
    script = f"""
        import json, open_clip, pathlib, torch, mugcp
        folder = pathlib.Path("clip_config"); folder.mkdir(exist_ok=True)
        (folder / "{TINY_CLIP}.json").write_text({json.dumps(json.dumps(TINY_CONFIG))})
        open_clip.add_model_config(folder)
        model = mugcp.create_model("coop", ["cat", "dog"], backbone="{TINY_CLIP}", pretrained="none")
        print(tuple(model(torch.randn(2, 3, 32, 32)).shape))
    """
    done = run(python, work, "-c", textwrap.dedent(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "(2, 2)"


def test_print_config_is_the_shipped_demo(installed):
    python, work = installed
    done = run(python, work, "-m", "mugcp.train", "--print-config")
    assert done.returncode == 0, done.stderr
    checkout = subprocess.run([sys.executable, "-m", "mugcp.train", "--print-config"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    assert checkout.returncode == 0, checkout.stderr
    assert done.stdout == checkout.stdout  # the wheel's demo is the checkout's configs/demo.yaml
    assert "dataset: fashion_mnist" in done.stdout and "name: mugcp" in done.stdout
    done = run(python, work, "-m", "mugcp.train", "--config", "methods/coop", "--print-config")
    assert done.returncode == 0 and "name: coop" in done.stdout, done.stderr


def test_sweep_files_and_recipes_resolve_from_the_wheel(installed):
    """The published sweep, each run given its recipe: the same plan from the wheel as from the checkout."""
    python, work = installed
    command = ["-m", "mugcp.sweep", "base2new", "--dry-run", "--json", "--root", "runs"]
    env = dict(os.environ, DATA=str(work))
    from_wheel = subprocess.run([str(python), *command], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    from_checkout = subprocess.run([sys.executable, *command], cwd=work, env=env, capture_output=True, text=True,
                                   timeout=300)
    assert from_wheel.returncode == 0, from_wheel.stderr
    plans = [[json.loads(line) for line in done.stdout.splitlines()] for done in (from_wheel, from_checkout)]
    for plan, configs in zip(plans, (Path(python).parent.parent, ROOT / "configs")):
        for run_plan in plan:  # each recipe is read from the configs of the installation that ran
            recipe = Path(run_plan["recipe"].pop("path"))
            assert recipe.parts[-3] == "recipes" and (recipe.is_relative_to(configs) or configs == ROOT / "configs")
    assert (plans[0] == plans[1]
            and len(plans[0]) == len(load_sweep(ROOT / 'configs' / 'sweeps' / 'base2new.yaml').methods) * 11 * 3)
    assert {run_plan["config"]["optim"]["lr"] for run_plan in plans[0] if run_plan["method"] == "maple"} == {0.0035}


def test_a_tiny_run_trains_from_the_wheel(installed, tmp_path):
    python, work = installed
    root = make_imagefolder(tmp_path, ["cat", "dog"], per_class={"train": 2, "test": 2})
    out = tmp_path / "run"
    script = f"""
        import open_clip, pathlib, runpy, sys
        folder = pathlib.Path("clip_config"); folder.mkdir(exist_ok=True)
        (folder / "{TINY_CLIP}.json").write_text({json.dumps(json.dumps(TINY_CONFIG))})
        open_clip.add_model_config(folder)
        sys.argv = ["mugcp.train", "--config", "methods/coop", "--output", "{out}", "data.dataset=imagefolder",
                    "data.root={root}", "model.backbone={TINY_CLIP}", "model.pretrained=none", "optim.epochs=1",
                    "data.batch_size=2", "train.progress=false", "train.tensorboard=false",
                    "data.compare_zeroshot=false"]
        runpy.run_module("mugcp.train", run_name="__main__")
    """
    done = run(python, work, "-c", textwrap.dedent(script))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] >= 1 and (out / "checkpoint" / "adapter_model.safetensors").is_file()


def test_extraction_from_the_wheel_loads_the_mllm(installed, tmp_path):
    python, work = installed
    mllm = build_tiny_mllm(tmp_path / "mllm")
    images = make_imagefolder(tmp_path / "data", ["cat"], per_class=2, splits=("train",))
    done = run(python, work, "-m", "mugcp.extract", "--mllm", str(mllm), "--images", str(images), "--out",
               str(tmp_path / "cache"), "--device", "cpu", "--max-new-tokens", "3", "--no-progress")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["mllm"] == str(mllm.resolve())


def test_from_the_checkout_root_kernels_is_hugging_faces_and_ours_is_mugcp_kernels():
    """python -m and pytest put the checkout root on sys.path: nothing there may be importable as ``kernels``."""
    done = subprocess.run([sys.executable, "-c",
                           "import kernels, mugcp.kernels; print(kernels.__file__); print(mugcp.kernels.__file__)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    theirs, ours = map(Path, done.stdout.split())
    assert theirs == Path(sysconfig.get_paths()["purelib"]) / "kernels" / "__init__.py"
    assert ours == ROOT / "mugcp" / "kernels" / "__init__.py"
