"""``dpsnake <command>``: the command line the Snakemake rules call.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their command runs, so ``dpsnake --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dpsnake.errors import UserError

# command -> (module, one-line help)
COMMANDS = {
    "check-config": ("dpsnake.workflow.check", "validate a config file and its referenced files"),
    "init-data": ("dpsnake.workflow.init_data", "build and label the initial dataset of one system"),
    "train": ("dpsnake.workflow.train", "train one DeePMD-kit model: dp train, freeze, convert to .dp"),
    "plan": ("dpsnake.workflow.plan", "write the walkers of an iteration from the exploration plan"),
    "explore": ("dpsnake.md.cli", "run all exploration walkers of an iteration as one batched job"),
    "select": ("dpsnake.workflow.select", "classify explored frames by model deviation and pick candidates"),
    "label": ("dpsnake.workflow.label", "label candidate frames with the configured labeler"),
    "collect": ("dpsnake.workflow.collect", "turn this iteration's labels into deepmd/npy datasets"),
    "finalize": ("dpsnake.workflow.finalize", "copy the last iteration's models to results/models/final"),
    "model-devi": ("dpsnake.engine.cli", "model deviation of an ensemble on given frames (like dp model-devi)"),
    "report": ("dpsnake.report.cli", "write the accuracy report of one iteration or of the whole run"),
    "status": ("dpsnake.report.status", "print the per-iteration summary of a run as a table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpsnake", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name in sys.argv[1:2]:
            # only the chosen command's module is imported to add its arguments
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        parser = build_parser()
    finally:
        sys.argv = saved
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return importlib.import_module(args._module).run(args) or 0
    except UserError as err:  # one clear line, no traceback
        print(f"dpsnake {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
