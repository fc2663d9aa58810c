"""``dpsnake report --config results/config.json (--iter N | --run)``.

``--iter N`` writes ``results/reports/iter.NNNNNN.{html,csv,json}``; ``--run`` writes
``results/reports/index.html``, ``run.csv`` and ``run.json`` (and any missing iteration reports).
"""

from __future__ import annotations

import pathlib

from dpsnake.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="the run's resolved config (results/config.json)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--iter", type=int, metavar="N", help="write the report of iteration N")
    what.add_argument("--run", action="store_true", help="write the run-level page (index.html, run.csv/json)")
    parser.add_argument(
        "--results-dir",
        default=None,
        help="results folder (default: config's results_dir, else the folder holding the config)",
    )
    parser.add_argument(
        "--benchmarks-dir",
        default=None,
        help="Snakemake benchmark folder (default: "
        "config's benchmarks_dir, else benchmarks/ next to the results folder)",
    )
    parser.add_argument("--rebuild", action="store_true", help="with --run: rewrite every iteration report")
    parser.add_argument(
        "--no-accuracy",
        action="store_true",
        help="skip the ensemble evaluation on labelled data (fast; no RMSE, no parity plots)",
    )


def run(args) -> int:
    from dpsnake.report import iteration
    from dpsnake.report import run as run_report

    ctx = iteration.context_from_config(
        pathlib.Path(args.config), args.results_dir, args.benchmarks_dir, accuracy=not args.no_accuracy
    )
    if args.run:
        paths = run_report.write(ctx, rebuild=args.rebuild)
    else:
        if args.iter < 0:
            raise UserError(f"--iter: must be >= 0, got {args.iter}")
        paths = iteration.write(ctx, args.iter)
    print("dpsnake report: wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
