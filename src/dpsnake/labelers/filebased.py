"""Shared machinery of the file-based DFT labelers: run a command template, map parsed frames back.

A file-based labeler writes its inputs into ``workdir``, runs the code through a command template
(``"mpirun -np {nproc} pw.x -in {input}"``), and parses the outputs with dpdata. The helpers here
hold the parts every code shares:

- ``run_command``: format the template, run it in ``workdir`` with stdout/stderr captured to files,
  thread/MPI environment set, a wall-clock timeout that kills the whole process group; never raises
  for the code's own failure (returns a ``RunOutcome``).
- ``species_order``: the stable permutation that groups atoms by element (VASP POSCAR, ABACUS STRU).
- ``result_from_system``: a dpdata ``LabeledSystem`` of one frame -> ``LabelResult`` in the
  *original* atom order and orientation (dpdata may rotate cells to lower-triangular form), after
  checking that the parsed structure is the frame that was sent.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
import signal
import subprocess
import time

import numpy as np

from dpsnake.errors import UserError, last_error_line
from dpsnake.labelers.base import LabelResult, sanity_check


@dataclasses.dataclass
class RunOutcome:
    """What happened to one run: exit code (None: did not start or timed out), wall seconds, reason."""

    returncode: int | None
    seconds: float
    reason: str | None  # None when the command exited 0
    stdout: pathlib.Path
    stderr: pathlib.Path


def check_template(command: str, key: str, required=(), allowed=("input", "output", "nproc", "nthreads", "workdir")):
    """Validate a command template before any work: one UserError naming the bad placeholder."""
    import string

    if not isinstance(command, str) or not command.strip():
        raise UserError(f"{key}: the command template must be a non-empty string")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(command) if f is not None}
    except ValueError as err:
        raise UserError(f"{key}: cannot parse command template {command!r}: {err}") from None
    unknown = sorted(n for n in names if n not in allowed)
    if unknown:
        raise UserError(f"{key}: unknown placeholder(s) {unknown} in {command!r}; allowed: {list(allowed)}")
    missing = [n for n in required if n not in names]
    if missing:
        raise UserError(f"{key}: the command template {command!r} must contain {{{missing[0]}}}")


# programs that start another program named further on in the command (MPI launchers, wrappers)
LAUNCHERS = {
    "mpirun",
    "mpiexec",
    "mpiexec.hydra",
    "orterun",
    "prterun",
    "srun",
    "aprun",
    "ibrun",
    "jsrun",
    "env",
    "time",
    "nice",
    "numactl",
    "taskset",
    "stdbuf",
    "nohup",
    "timeout",
}
SHELLS = {"sh", "bash", "dash", "zsh"}


def _is_program(token: str, path: str | None) -> bool:
    import shutil

    if "/" in token:
        return os.path.isfile(os.path.expanduser(token)) and os.access(os.path.expanduser(token), os.X_OK)
    return shutil.which(token, path=path) is not None


def missing_program(command: str, key: str = "label.command", env: dict | None = None, **fields) -> str | None:
    """Why the program of a command template cannot start (None: it can): a path that does not exist
    or a name not on PATH (``env['PATH']`` when given), looked up the way the label job will.

    Behind a launcher (``mpirun -np {nproc} pw.x``) the program is the first word after the launcher's
    options that is an executable; absolute paths there must exist. ``sh -c 'SCRIPT'`` checks the
    script's first command. Relative paths with a folder are left alone: they start from the frame's
    work folder, which does not exist yet.
    """
    import re

    path = (env or {}).get("PATH", os.environ.get("PATH"))
    values = dict(nproc=1, nthreads=1, workdir=".", input="input", output="output")
    values.update(fields)
    argv = shlex.split(command.format(**values))
    if not argv:
        return f"{key}: empty command"
    prog = argv[0]
    name = os.path.basename(prog)
    if not _is_program(prog, path):
        if "/" in prog and not os.path.isabs(os.path.expanduser(prog)):
            return None
        where = "no such executable file" if "/" in prog else "not found on PATH"
        return (
            f"{key}: cannot start {prog!r}: {where} (give the full path of the program, or put it on PATH "
            f"before starting dpsnake/Snakemake: the label jobs inherit it)"
        )
    if name in SHELLS and len(argv) >= 3 and argv[1] == "-c":
        first = re.split(r"&&|\|\||[;|&\n]", argv[2])[0]
        return missing_program(first.replace("{", "{{").replace("}", "}}"), key, env) if first.strip() else None
    if name not in LAUNCHERS:
        return None
    rest = argv[1:]
    for tok in rest:  # an absolute path behind the launcher that does not exist is the mistake
        if os.path.isabs(tok) and not os.path.exists(tok):
            return f"{key}: {tok!r}: no such file (the program {name} should start)"
    words = [t for t in rest if not t.startswith("-") and "=" not in t and not t.replace(".", "").isdigit()]
    if words and not any(_is_program(t, path) for t in words):
        return (
            f"{key}: {name} starts no program found on PATH (looked for {', '.join(map(repr, words))}); "
            "give the program's full path"
        )
    return None


def tail(path: pathlib.Path, nlines: int = 3, nchars: int = 300) -> str:
    """Last few non-empty lines of a text file as one line (for failure reasons)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-nlines:])[-nchars:]


def _end(path: pathlib.Path, nbytes: int = 65536) -> str:
    """The last ``nbytes`` of a text file ("" if unreadable): where a code prints why it stopped."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - nbytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def run_command(
    command: str,
    workdir: pathlib.Path,
    *,
    nproc: int = 1,
    nthreads: int = 1,
    timeout: float | None = None,
    stdout_name: str = "stdout",
    stderr_name: str = "stderr",
    env: dict | None = None,
    **fields,
) -> RunOutcome:
    """Run ``command.format(nproc=..., nthreads=..., workdir=..., **fields)`` in ``workdir``.

    stdout and stderr go to ``workdir/stdout_name`` / ``stderr_name``; ``OMP_NUM_THREADS`` is set to
    ``nthreads`` (MPI ranks x threads should not exceed the cores the job was given). ``timeout``
    (seconds) kills the whole process group (mpirun and its ranks) and reports it as a failure.
    """
    workdir = pathlib.Path(workdir)
    argv = shlex.split(command.format(nproc=nproc, nthreads=nthreads, workdir=str(workdir), **fields))
    full_env = dict(os.environ)
    full_env.update(
        {"OMP_NUM_THREADS": str(nthreads), "OPENBLAS_NUM_THREADS": str(nthreads), "MKL_NUM_THREADS": str(nthreads)}
    )
    if os.geteuid() == 0:  # Open MPI refuses to start as root unless told (containers, CI)
        full_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        full_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    full_env.update({k: str(v) for k, v in (env or {}).items()})
    out, err = workdir / stdout_name, workdir / stderr_name
    start = time.monotonic()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        try:
            proc = subprocess.Popen(
                argv, cwd=workdir, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=full_env, start_new_session=True
            )
        except OSError as exc:  # binary missing, not executable
            return RunOutcome(None, 0.0, f"cannot start {argv[0]!r}: {exc.strerror or exc}", out, err)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session: mpirun and every rank
            except ProcessLookupError:  # it ended in between
                pass
            proc.wait()
            return RunOutcome(None, time.monotonic() - start, f"timed out after {timeout:g} s: {command}", out, err)
    seconds = time.monotonic() - start
    if rc != 0:
        # the code's own last error line ("Error in routine init_pos (1): atomic species info missing"),
        # not MPI's abort boilerplate that ends stderr
        why = last_error_line(_end(out) + "\n" + _end(err))
        return RunOutcome(
            rc,
            seconds,
            (f"{why} ({argv[0]} exited with code {rc})" if why else f"{argv[0]} exited with code {rc}"),
            out,
            err,
        )
    return RunOutcome(0, seconds, None, out, err)


def species_order(symbols) -> tuple[list[str], np.ndarray]:
    """Elements in order of first appearance and the stable permutation that groups atoms by them.

    ``atoms[order]`` is the atom order written to POSCAR/STRU (one block per element); a parsed
    per-atom array ``a`` in that order maps back with ``out[order] = a``.
    """
    symbols = list(symbols)
    elements = list(dict.fromkeys(symbols))
    order = np.argsort([elements.index(s) for s in symbols], kind="stable")
    return elements, order


def result_from_system(system, atoms, order=None, coord_tol: float = 1e-3, rotated: bool = True) -> LabelResult:
    """One-frame dpdata LabeledSystem -> LabelResult in ``atoms``' atom order and orientation.

    ``order``: the permutation the input file used (``species_order``), None for the same order.
    ``rotated``: whether the reader may have rotated the cell (dpdata's lower-triangular post-step);
    False for readers that keep the input axes but print the cell with few digits (CP2K).
    The parsed species and (rotated-back) positions must match ``atoms`` within ``coord_tol`` A
    modulo the cell, or the output is taken as belonging to another structure (a failure).
    """
    n = len(atoms)
    order = np.arange(n) if order is None else np.asarray(order)
    if system.get_nframes() < 1:
        return LabelResult.failed("output holds no labelled frame")
    if system.get_nframes() > 1:
        system = system[-1:]
    names = system["atom_names"]
    parsed_symbols = [names[t] for t in system["atom_types"]]
    sent = [atoms[i].symbol for i in order]
    if len(parsed_symbols) != n or parsed_symbols != sent:
        return LabelResult.failed(
            f"output species {parsed_symbols[:6]}... (n={len(parsed_symbols)}) "
            f"do not match the frame's {sent[:6]}... (n={n})"
        )
    energy = float(system["energies"][0])
    forces_p = np.asarray(system["forces"][0], dtype=float)
    coords_p = np.asarray(system["coords"][0], dtype=float)
    virial = None
    rot = np.eye(3)
    cell = np.asarray(atoms.cell.array, dtype=float)
    if rotated and "cells" in system.data and abs(np.linalg.det(cell)) > 1e-8:
        # dpdata may rotate the cell to lower-triangular form: cell_p = cell @ rot with rot orthogonal
        cell_p = np.asarray(system["cells"][0], dtype=float)
        rot = np.linalg.solve(cell, cell_p)
        if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-5):
            if np.any(atoms.pbc):
                return LabelResult.failed("output cell is not the frame's cell (up to a rotation)")
            rot = np.eye(3)  # a molecule in a box the code chose itself: no rotation to undo
    forces = np.empty_like(forces_p)
    forces[order] = forces_p @ rot.T
    coords = np.empty_like(coords_p)
    coords[order] = coords_p @ rot.T
    delta = coords - atoms.positions
    if np.any(atoms.pbc):  # compare modulo lattice vectors (codes may wrap positions)
        frac = np.linalg.solve(atoms.cell.array.T, delta.T).T
        frac[:, atoms.pbc] -= np.round(frac[:, atoms.pbc])
        delta = frac @ atoms.cell.array
    if np.abs(delta).max(initial=0.0) > coord_tol:
        return LabelResult.failed(f"output positions differ from the frame's by {np.abs(delta).max():.3g} A")
    if atoms.pbc.all() and "virials" in system.data:
        v = np.asarray(system["virials"][0], dtype=float)
        virial = rot @ v @ rot.T
    return sanity_check(LabelResult(ok=True, energy=energy, forces=forces, virial=virial), n, None)


def require_file(path, key: str) -> pathlib.Path:
    """An existing file named in the config, or a UserError naming the key."""
    p = pathlib.Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise UserError(f"{key}: file not found: {p}")
    return p


def require_dir(path, key: str) -> pathlib.Path:
    """An existing folder named in the config, or a UserError naming the key."""
    p = pathlib.Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise UserError(f"{key}: folder not found: {p}")
    return p


def require_pseudopotentials(pseudo_dir, pseudopotentials) -> tuple[pathlib.Path, dict]:
    """label.pseudo_dir and label.pseudopotentials {element: file}: both checked, or a UserError."""
    folder = require_dir(pseudo_dir, "label.pseudo_dir").resolve()
    if not isinstance(pseudopotentials, dict) or not pseudopotentials:
        raise UserError("label.pseudopotentials: give a mapping element -> pseudopotential file")
    for el, fname in pseudopotentials.items():
        if not (folder / str(fname)).is_file():
            raise UserError(f"label.pseudopotentials.{el}: {fname!r} not found in {folder}")
    return folder, {str(k): str(v) for k, v in pseudopotentials.items()}


def kmesh(atoms, kspacing: float) -> list[int]:
    """Monkhorst-Pack mesh for a k-point spacing in 1/A with VASP's convention (2 pi included):
    ``n_i = max(1, ceil(2 pi |b_i| / kspacing))``, b_i the reciprocal vectors without 2 pi; 1 along
    non-periodic directions."""
    recip = np.linalg.norm(atoms.cell.reciprocal(), axis=1)
    mesh = [max(1, int(np.ceil(2 * np.pi * r / kspacing - 1e-8))) for r in recip]
    return [m if p else 1 for m, p in zip(mesh, atoms.pbc)]


class CommandLabeler:
    """Template for labelers that write inputs, run a code, and parse its outputs (one frame a call).

    Subclasses set ``name`` and implement ``write_inputs(atoms, workdir) -> dict`` (anything
    ``parse`` needs, e.g. the atom order) and ``parse(atoms, workdir, outcome, ctx) -> LabelResult``
    (code-specific checks first: an SCF that did not converge is named as such, not as an exit code).
    Common keys: ``command`` (template with {input} {output} {nproc} {nthreads} {workdir}),
    ``nproc`` (MPI ranks), ``nthreads`` (OpenMP threads), ``timeout`` (s), ``env`` (extra variables).
    """

    name = "command"
    input_name = "input"
    output_name = "output"

    stale = ()  # outputs of an earlier attempt in the same workdir, removed before a run

    def __init__(
        self,
        command: str,
        nproc: int = 1,
        nthreads: int = 1,
        timeout: float | None = None,
        env: dict | None = None,
        keep_scratch: bool = False,
        **unknown,
    ):
        if unknown:
            raise UserError(f"label: unknown key(s) {sorted(unknown)} for label.type {self.name!r}")
        check_template(command, "label.command")
        for key, val in (("nproc", nproc), ("nthreads", nthreads)):
            if not isinstance(val, int) or val < 1:
                raise UserError(f"label.{key}: must be a positive integer, got {val!r}")
        if env is not None and not isinstance(env, dict):
            raise UserError(f"label.env: give a mapping of environment variables (NAME: value), got {env!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise UserError(f"label.timeout: must be a positive number of seconds, got {timeout!r}")
        self.command, self.nproc, self.nthreads = command, nproc, nthreads
        self.timeout, self.env, self.keep_scratch = timeout, dict(env or {}), keep_scratch

    def preflight(self) -> None:
        """Check-time: the code's executable exists (else every frame would fail with 'cannot start')."""
        why = missing_program(self.command, "label.command", self.env, input=self.input_name, output=self.output_name)
        if why:
            raise UserError(why)

    def write_inputs(self, atoms, workdir: pathlib.Path) -> dict:
        raise NotImplementedError

    def parse(self, atoms, workdir: pathlib.Path, outcome: RunOutcome, ctx: dict) -> LabelResult:
        raise NotImplementedError

    def cleanup(self, workdir: pathlib.Path) -> None:
        """Remove scratch (wavefunctions, restart files) unless ``keep_scratch``; subclasses override."""

    def label(self, atoms, workdir) -> LabelResult:
        """Write inputs into ``workdir``, run, parse. Config errors raise UserError; a failed
        calculation (non-zero exit, SCF not converged, timeout, missing/garbled output) returns
        ``LabelResult.failed(reason)``."""
        import shutil

        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in self.stale:  # never parse what an earlier attempt left behind
            path = workdir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        try:
            ctx = self.write_inputs(atoms, workdir)
        except UserError:
            raise
        except Exception as err:  # a frame the writer cannot express is a failed frame, not a crash
            return LabelResult.failed(f"cannot write inputs: {type(err).__name__}: {err}")
        # a template that names {output} writes it itself (cp2k -o {output}): stdout goes elsewhere
        stdout = "stdout" if "{output}" in self.command else ctx.get("stdout", "stdout")
        outcome = run_command(
            self.command,
            workdir,
            nproc=self.nproc,
            nthreads=self.nthreads,
            timeout=self.timeout,
            stdout_name=stdout,
            env=self.env,
            input=self.input_name,
            output=self.output_name,
        )
        try:
            result = self.parse(atoms, workdir, outcome, ctx)
        except Exception as err:  # any parser crash means the output cannot be trusted
            why = f"; {outcome.reason}" if outcome.reason else ""
            result = LabelResult.failed(f"garbled or missing output ({type(err).__name__}: {err}){why}")
        finally:
            if not self.keep_scratch:
                self.cleanup(workdir)
        if result.ok and outcome.reason:  # parsed fine but the code said it failed: do not trust it
            result = LabelResult.failed(outcome.reason)
        return result
