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


# ---------------------------------------------------------------- the papers' layouts
def write_metrics(folder, **fields):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"backbone": "ViT-B-16", "pretrained": True, **fields}))


def test_base2new_layout_has_a_block_per_dataset_and_the_average(tmp_path):
    for seed, (b, n) in enumerate([(80.0, 60.0), (82.0, 62.0)], 1):
        write_run(tmp_path / "runs" / f"dtd{seed}", seed, b, n)
    write_metrics(tmp_path / "runs" / "pets1", method="coop", dataset="oxford_pets", protocol="base2new", shots=16,
                  seed=1, base={"accuracy": 90.0}, new={"accuracy": 70.0}, hm=78.75)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--layout", "base2new"]) == 0
    table = (tmp_path / "report" / "results.md").read_text()
    average = table.split("### Average over 2 datasets\n")[1].split("###")[0]
    # mean of the per-dataset means (81, 90) and (61, 70); HM of those averages
    assert "| coop | 85.50 | 65.50 | 74.18 | 2 of 2 |" in average
    assert ("### dtd\n\n| method | base | new | HM of means | seeds |\n|---|---|---|---|---|\n"
            "| coop | 81.00 ± 1.41 | 61.00 ± 1.41 | 69.59 | 1,2 |") in table


def test_fewshot_layout_has_a_column_per_k(tmp_path):
    for k, acc in ((1, 50.0), (2, 55.0), (4, 60.0)):
        for seed in (1, 2):
            write_metrics(tmp_path / "runs" / f"k{k}s{seed}", method="coop", dataset="dtd", protocol="all", shots=k,
                          seed=seed, all={"accuracy": acc + seed})
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--layout", "fewshot"])
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| method | K=1 | K=2 | K=4 |" in table
    assert "| coop | 51.50 ± 0.71 | 56.50 ± 0.71 | 61.50 ± 0.71 |" in table
    assert (tmp_path / "report" / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_domain_generalization_layout_reads_the_evaluations_of_each_run(tmp_path):
    for seed, (source_acc, shift) in enumerate([(70.0, 0.0), (72.0, 2.0)], 1):
        run = tmp_path / "runs" / f"maple_s{seed}"
        write_metrics(run, method="maple", dataset="imagenet", protocol="all", shots=16, seed=seed,
                      all={"accuracy": source_acc})
        for target, acc in (("imagenet_v2", 64.0), ("imagenet_a", 50.0)):
            write_metrics(run / f"eval_{target}", method="maple", dataset=target, protocol="all", seed=seed,
                          checkpoint=str(run / "checkpoint"), all={"accuracy": acc + shift})
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--layout", "domain_generalization"])
    table = (tmp_path / "report" / "results.md").read_text()
    assert "## Domain generalisation" in table
    assert "| method | source: imagenet | imagenet_v2 | imagenet_a | Average |" in table
    assert "| maple | 71.00 ± 1.41 | 65.00 ± 1.41 | 51.00 ± 1.41 | 58.00 |" in table
    rows = list(csv.DictReader(open(tmp_path / "report" / "results.csv")))
    assert [(r["dataset"], r["role"], r["mean"]) for r in rows] == [("imagenet", "source", "71.0"),
                                                                    ("imagenet_v2", "target", "65.0"),
                                                                    ("imagenet_a", "target", "51.0")]


def test_a_datasets_hm_is_the_hm_of_its_seed_averaged_base_and_new(tmp_path):
    # Per-seed HMs are 18 and 18; the papers' HM of the averages (50, 50) is 50.
    write_run(tmp_path / "runs" / "a", 1, 90.0, 10.0)
    write_run(tmp_path / "runs" / "b", 2, 10.0, 90.0)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--layout", "base2new"]) == 0
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| method | base | new | HM of means | seeds |" in table
    assert "| coop | 50.00 ± 56.57 | 50.00 ± 56.57 | 50.00 | 1,2 |" in table


def test_the_hm_of_means_is_named_for_what_it_is_and_has_no_spread(tmp_path, monkeypatch):
    # Issue 21.4: base/new 13.33/33.33 and 33.33/13.33 have an HM of 19.05 each; the HM of the seed-averaged
    # base and new (23.33, 23.33) is 23.33. It used to read "hm 23.33 ± 0.00" in a column "hm_mean".
    write_run(tmp_path / "runs" / "a", 1, 13.33, 33.33)
    write_run(tmp_path / "runs" / "b", 2, 33.33, 13.33)
    figures = []
    monkeypatch.setattr("mugcp.reports.plots._save", lambda fig, plt, path: figures.append(fig))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "groups")]) == 0
    table = (tmp_path / "groups" / "results.md").read_text()
    assert ("| dataset | method | protocol | shots | backbone | seeds | base | new | HM of means | per-seed HM |"
            in table)
    assert ("| dtd | coop | base2new | 16 | ViT-B-16 | 1,2 | 23.33 ± 14.14 | 23.33 ± 14.14 | 23.33 | 19.04 ± 0.00 |"
            in table)
    assert "HM of means: the harmonic mean of the seed-averaged base and new accuracies" in table
    coop = next(csv.DictReader(open(tmp_path / "groups" / "results.csv")))
    assert "hm_mean" not in coop and "hm_std" not in coop
    assert float(coop["hm_of_means"]) == pytest.approx(23.33)
    assert float(coop["hm_per_seed_mean"]) == pytest.approx(2 * 13.33 * 33.33 / 46.66)
    assert (float(coop["hm_per_seed_std"]), coop["hm_per_seed_n"]) == (0.0, "2")
    ax = figures[0].axes[0]
    assert ax.get_ylabel() == "HM of mean base, mean new %"
    assert ax.get_title() == "HM of the seed-averaged base and new accuracies"
    assert [round(bar.get_height(), 2) for bar in ax.patches] == [23.33] and not ax.lines  # no error bar


def test_a_layout_with_nothing_to_show_is_one_line(tmp_path, capsys):
    from mugcp.cli import run_cli

    write_run(tmp_path / "runs" / "a", 1, 80.0, 60.0)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--layout", "fewshot"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --layout fewshot: none of the 1 runs under {tmp_path / 'runs'} has an accuracy on all classes "
        "(protocol fewshot or all); their protocols: base2new. Use --layout base2new or groups.\n")
    assert not (tmp_path / "report").exists()

    write_metrics(tmp_path / "few" / "a", method="coop", dataset="dtd", protocol="fewshot", shots=4, seed=1,
                  all={"accuracy": 50.0})
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([str(tmp_path / "few"), "--out", str(tmp_path / "report"), "--layout", "base2new"]))
    assert exit_info.value.code == 2
    assert ("has base and new accuracies (protocol base2new); their protocols: fewshot. "
            "Use --layout fewshot or groups." in capsys.readouterr().err)
