"""Issue 23: mugcp.report puts what runs cost beside their accuracy (cost table in results.md, cost.csv, cost.png)."""

import csv
import json

import pytest

from mugcp.report import main


def write_run(folder, seed, method, hm, **cost):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(
        json.dumps(
            {
                "method": method,
                "dataset": "dtd",
                "protocol": "base2new",
                "shots": 16,
                "backbone": "ViT-B-16",
                "seed": seed,
                "pretrained": True,
                "base": {"accuracy": hm},
                "new": {"accuracy": hm},
                "hm": hm,
                **cost,
            }
        )
    )


def test_cost_is_the_mean_over_seeds_per_method_and_dataset(tmp_path, capsys):
    write_run(
        tmp_path / "runs" / "a",
        1,
        "coop",
        60.0,
        train_time_s=100.0,
        eval_images_per_s=400.0,
        peak_memory_mb=1000.0,
        trainable_parameters=8192,
    )
    write_run(
        tmp_path / "runs" / "b",
        2,
        "coop",
        62.0,
        train_time_s=120.0,
        eval_images_per_s=500.0,
        peak_memory_mb=1100.0,
        trainable_parameters=8192,
    )
    write_run(
        tmp_path / "runs" / "c",
        1,
        "maple",
        70.0,
        train_time_s=300.5,
        peak_memory_mb=2500.0,
        trainable_parameters=3555072,
    )
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "results.md").read_text()
    cost = table.split("## Cost\n")[1]
    assert "| dtd | coop | ViT-B-16 | 2 | 110.0 | 450.0 | 1,050 | 8,192 |" in cost
    assert (
        "| dtd | maple | ViT-B-16 | 1 | 300.5 |  | 2,500 | 3,555,072 |" in cost
    )  # a field no run recorded stays empty
    assert table.index("| dtd | coop | base2new |") < table.index(
        "## Cost"
    )  # the accuracy table comes first, unchanged
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "report" / "cost.csv"))}
    assert float(rows["coop"]["train_time_s"]) == pytest.approx(110.0) and rows["coop"]["seeds"] == "2"
    assert float(rows["coop"]["accuracy"]) == pytest.approx(61.0) and rows["coop"]["accuracy_metric"] == "hm"
    assert rows["maple"]["eval_images_per_s"] == ""
    assert (tmp_path / "report" / "cost.png").read_bytes()[:4] == b"\x89PNG"
    assert "cost (training time, evaluation images/s, peak memory, trainable parameters)" in capsys.readouterr().out


def test_runs_that_recorded_no_cost_get_no_cost_table(tmp_path):
    write_run(tmp_path / "runs" / "a", 1, "coop", 60.0)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert "## Cost" not in (tmp_path / "report" / "results.md").read_text()
    assert not (tmp_path / "report" / "cost.csv").exists() and not (tmp_path / "report" / "cost.png").exists()
