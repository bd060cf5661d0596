"""mugcp.report aggregates metrics.json files over seeds into tables and a plot."""
import csv
import json

import pytest

from mugcp.report import main


def write_run(folder, seed, base, new, method="coop"):
    folder.mkdir(parents=True)
    hm = 2 * base * new / (base + new)
    (folder / "metrics.json").write_text(json.dumps({
        "method": method, "dataset": "dtd", "protocol": "base2new", "shots": 16, "backbone": "ViT-B-16",
        "seed": seed, "pretrained": True, "base": {"accuracy": base}, "new": {"accuracy": new}, "hm": hm,
    }))


def test_mean_and_std_over_seeds(tmp_path, capsys):
    write_run(tmp_path / "runs" / "a", 1, 80.0, 60.0)
    write_run(tmp_path / "runs" / "b", 2, 82.0, 62.0)
    write_run(tmp_path / "runs" / "c", 1, 70.0, 50.0, method="maple")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| dtd | coop | base2new | 16 | ViT-B-16 | 1,2 | 81.00 ± 1.41 | 61.00 ± 1.41 |" in table
    assert "| dtd | maple | base2new | 16 | ViT-B-16 | 1 | 70.00 ± 0.00 | 50.00 ± 0.00 |" in table
    rows = list(csv.DictReader(open(tmp_path / "report" / "results.csv")))
    coop = next(r for r in rows if r["method"] == "coop")
    assert float(coop["base_mean"]) == pytest.approx(81.0) and coop["base_n"] == "2"
    assert (tmp_path / "report" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "3 runs in 2 groups" in capsys.readouterr().out


def test_no_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no training runs"):
        main([str(tmp_path / "empty")])


def test_repeated_seeds_are_warned_about(tmp_path, capsys):
    write_run(tmp_path / "runs" / "a", 1, 80.0, 60.0)
    write_run(tmp_path / "runs" / "b", 1, 82.0, 62.0)
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    assert "several runs with the same seed ([1, 1])" in capsys.readouterr().err
