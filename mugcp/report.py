"""``python -m mugcp.report RUNS_DIR [...] [--out DIR] [--layout L]``: seeds → mean ± std tables and a plot.

Reads the ``metrics.json`` every run writes (never log text), groups runs by dataset, method,
protocol, shots and backbone, and writes ``results.md``, ``results.csv`` and ``results.png``.
``--layout`` picks the table: ``groups`` (one row per group, the default) or a paper's layout:
``base2new`` (per dataset base / new / HM per method, and the average over datasets), ``fewshot``
(accuracy per number of shots K), ``cross_dataset`` / ``domain_generalization`` (source accuracy
and the accuracy on every target dataset evaluated with ``mugcp.evaluate``, and their average).
"""
from __future__ import annotations

import argparse

from mugcp.cli import run_cli
from mugcp.reports.tables import LAYOUTS
from mugcp.runs.layout import REPORT_DIR
from mugcp.utils import check_output_folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="folders searched recursively for runs (metrics.json)")
    parser.add_argument("--out", default=REPORT_DIR, help=f"output folder (default: {REPORT_DIR}/)")
    parser.add_argument("--layout", default="groups", choices=LAYOUTS, help="table layout (default: groups)")
    args = parser.parse_args(argv)
    check_output_folder(args.out, "--out")
    from mugcp.reports import write_report

    write_report(args.runs, args.out, args.layout)
    return 0


if __name__ == "__main__":
    run_cli(main)
