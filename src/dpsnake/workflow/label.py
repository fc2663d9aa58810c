"""``dpsnake label``: label candidate frames with the configured labeler.

Each input frame (``select/candidates/task.N.extxyz``) gives one output (``label/task.N.extxyz``,
written atomically by ``dpsnake.labelers.io.write_labeled``). A failed label (crash, no SCF convergence,
forces above ``label.max_force``) is written with ``label_ok = False`` plus ``task.N.failed.json``
holding the reason and the frame's key (``select.frame_id``): it never enters a dataset, and
``dpsnake select`` never picks that frame again. Scratch files go to ``label/work/task.N/``.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import time

from dpsnake.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="results/config.json")
    parser.add_argument("--input", nargs="+", required=True, help="candidate frames (extxyz, one frame each)")
    parser.add_argument("--output", nargs="+", required=True, help="labelled frames, one per input")
    parser.add_argument("--keep-work", action="store_true", help="keep the labeler's scratch folders")


def run(args) -> int:
    import ase.io

    from dpsnake.fsio import write_json_atomic
    from dpsnake.labelers import make_labeler, sanity_check
    from dpsnake.labelers.io import write_labeled
    from dpsnake.workflow.config import read_resolved
    from dpsnake.workflow.select import frame_id

    if len(args.input) != len(args.output):
        raise UserError(f"--output: {len(args.output)} paths for {len(args.input)} inputs")
    cfg = read_resolved(args.config)
    labeler = make_labeler(cfg["label"])
    for src, dst in zip(args.input, args.output):
        dst = pathlib.Path(dst)
        atoms = ase.io.read(src, format="extxyz")
        info = dict(atoms.info)
        key = frame_id(atoms.positions, atoms.cell.array)  # before the labeler can touch the frame
        work = dst.parent / "work" / dst.name.removesuffix(".extxyz")
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        res = sanity_check(labeler.label(atoms, work), len(atoms), cfg["label"].get("max_force"))
        info["label_seconds"] = round(time.perf_counter() - t0, 3)
        failed_json = dst.with_name(dst.name.removesuffix(".extxyz") + ".failed.json")
        if res.ok:
            failed_json.unlink(missing_ok=True)
            print(f"label {dst.name}: ok, E = {res.energy:.4f} eV ({labeler.name}, {info['label_seconds']} s)")
        else:
            write_json_atomic(
                failed_json,
                {
                    "task": info.get("task"),
                    "system": info.get("system"),
                    "walker": info.get("walker"),
                    "step": info.get("step"),
                    "key": key,
                    "reason": res.reason,
                },
            )
            print(f"label {dst.name}: FAILED: {res.reason}", file=sys.stderr)
        write_labeled(dst, atoms, res, info)  # last: the output exists only when complete
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0
