"""``dpsnake <command>``: the command line the Snakemake rules call.

``COMMANDS`` below is the one registry of subcommands: each maps to the module that defines its
``add_arguments(parser)`` and ``run(args)`` (a workflow step's own module, ``md.explore``,
``model_devi_command``, ``report.command``, ``report.status``); modules are imported only when their
command runs, so ``dpsnake --help`` stays fast. No package has a command line of its own.

Every failure ends with ONE last line ``dpsnake <command>: error: <cause>`` on stderr: the rules send
stderr to their log, and Snakemake's error summary shows the log (``show-failed-logs`` in the profiles),
so the cause is the last thing a user reads. Bad input (:class:`UserError`), a file system fault
(``OSError``: the path and what to do) and a missing package are that one line and exit 2; any other
exception is a bug or an unforeseen fault: its traceback is printed above the line (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from dpsnake.errors import UserError, one_line, os_error_message

# command -> (module, one-line help)
COMMANDS = {
    "check-config": ("dpsnake.workflow.check", "validate a config file and its referenced files"),
    "init-data": ("dpsnake.workflow.init_data", "build and label the initial dataset of one system"),
    "train": ("dpsnake.workflow.train", "train one DeePMD-kit model: dp train, freeze, convert to .dp"),
    "plan": ("dpsnake.workflow.plan", "write the walkers of an iteration from the exploration plan"),
    "explore": ("dpsnake.md.explore", "run all exploration walkers of an iteration as one batched job"),
    "explore-warmup": (
        "dpsnake.md.warmup",
        "compile the exploration's GPU kernels with an untrained model (iteration 0)",
    ),
    "merge-shards": ("dpsnake.workflow.shards", "join the shards of a sharded exploration into one summary"),
    "select": ("dpsnake.workflow.select", "classify explored frames by model deviation and pick candidates"),
    "label": ("dpsnake.workflow.label", "label candidate frames with the configured labeler"),
    "collect": ("dpsnake.workflow.collect", "turn this iteration's labels into deepmd/npy datasets"),
    "finalize": ("dpsnake.workflow.finalize", "copy the last iteration's models to results/models/final"),
    "model-devi": ("dpsnake.model_devi_command", "model deviation of an ensemble on given frames (like dp model-devi)"),
    "report": ("dpsnake.report.command", "write the accuracy report of one iteration or of the whole run"),
    "status": ("dpsnake.report.status", "print the per-iteration summary of a run as a table"),
    "import-dpgen": ("dpsnake.importers.dpgen", "convert a DP-GEN param.json (+ machine.json) to a dpsnake config"),
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
    """Run one command; returns its exit code. ``argv`` None: run as the program (``sys.argv``)."""
    program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        saved, sys.argv = sys.argv, [sys.argv[0], *argv]
        try:
            parser = build_parser()
        finally:
            sys.argv = saved
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        return importlib.import_module(args._module).run(args) or 0
    except UserError as err:  # one clear line, no traceback
        return _fail(command, str(err), 2, program)
    except OSError as err:  # permission denied, disk full...: the path and what to do
        return _fail(command, os_error_message(err), 2, program)
    except ModuleNotFoundError as err:
        if (err.name or "dpsnake").split(".")[0] != "dpsnake":  # a package the command needs is missing
            return _fail(
                command,
                f"{err}: install it in the Python environment that runs the workflow (or the rule's conda environment)",
                2,
                program,
            )
        return _unexpected(command, err, program)
    except KeyboardInterrupt:
        return _fail(command, "interrupted", 130, program)
    except Exception as err:  # a bug or an unforeseen fault: the traceback says where, the last line what
        return _unexpected(command, err, program)


def _unexpected(command: str | None, err: Exception, program: bool) -> int:
    traceback.print_exc()
    return _fail(command, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__, 1, program)


def _fail(command: str | None, cause: str, code: int, program: bool) -> int:
    """Print the last line of a failed command. Run as the program, output that libraries write while the
    interpreter exits (TensorFlow's CUDA stub loader prints after everything else) is discarded, so the
    cause stays the log's last line."""
    try:
        sys.stdout.flush()  # buffered output must land above the cause, not below it
    except (OSError, ValueError):
        pass
    name = f"dpsnake {command}" if command else "dpsnake"
    print(f"{name}: error: {one_line(cause) or 'failed'}", file=sys.stderr, flush=True)
    if program:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    return code


if __name__ == "__main__":
    sys.exit(main())
