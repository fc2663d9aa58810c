"""Damaged model files and frames the engine cannot evaluate (issue 19 items 4 and 7), through
``dpsnake model-devi`` and ``dpsnake explore``: exit 2 and one line naming the file (and the array
at fault, or the frame).

The models are real: the tiny Cu model the engine tests train with DeePMD-kit (tests/dpmodels.py,
cached in DPSNAKE_TEST_CACHE, else once per session), then damaged on disk or with h5py.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import tempfile

from bad_inputs import Probe, dpsnake

# The Cu model's datasets as DeePMD-kit 3.2's converter numbers them (checked by _ref)
W_FIT = "/variable_0006"  # fitting net 0 layer 0 w (32, 8)
W_EMB = "/variable_0002"  # embedding net 0 layer 1 w (4, 8)
DSTD = "/variable_0005"


@functools.cache
def _model() -> str:
    from dpmodels import train_model

    cache = os.environ.get("DPSNAKE_TEST_CACHE") or tempfile.mkdtemp(prefix="dpsnake-probe-models-")
    return str(train_model(pathlib.Path(cache))["dp"])


def _ref(path, what) -> str:
    """The dataset the model's JSON names for ``what`` ('fitting 0 0 w': fitting net 0 layer 0 w)."""
    import h5py

    kind, net, layer, var = what.split()
    with h5py.File(path, "r") as f:
        m = json.loads(f.attrs["json"])["model"]
    if kind == "dstd":
        return m["descriptor"]["@variables"]["dstd"]
    nets = m["fitting"]["nets"] if kind == "fitting" else m["descriptor"]["embeddings"]
    return nets["networks"][int(net)]["layers"][int(layer)]["@variables"][var]


def _copy(tmp: pathlib.Path, name: str, expect: tuple[str, str] | None = None) -> pathlib.Path:
    dst = tmp / name
    shutil.copy(_model(), dst)
    if expect:  # the probe's expected text names this dataset
        assert _ref(dst, expect[0]) == expect[1], f"{expect[0]} is no longer {expect[1]} in {_model()}"
    return dst


def _frames(tmp: pathlib.Path, name="cu.extxyz", overlap_frame=None, natoms=None) -> str:
    """Two or more rattled fcc Cu frames; ``overlap_frame``: that frame has two atoms at one place;
    ``natoms=0``: one frame of an empty periodic box."""
    import ase.io
    from ase import Atoms
    from ase.build import bulk

    if natoms == 0:
        ase.io.write(tmp / name, Atoms(cell=[10, 10, 10], pbc=True))
        return name
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    a.rattle(0.05, seed=1)
    frames = [a.copy() for _ in range(4)]
    if overlap_frame is not None:
        frames[overlap_frame].positions[1] = frames[overlap_frame].positions[0]
    ase.io.write(tmp / name, frames)
    return name


def _model_devi(tmp: pathlib.Path, bad: str, system: str | None = None):
    good = _copy(tmp, "good.dp").name
    return dpsnake("model-devi", "-m", bad, good, "-s", system or _frames(tmp), "-o", "model_devi.out", cwd=tmp)


def _overwrite(p: pathlib.Path, ref: str, byte: bytes) -> None:
    """Overwrite the bytes HDF5 stores for dataset ``ref`` of file ``p`` on disk with ``byte``."""
    import h5py

    with h5py.File(p, "r") as f:
        off, size = f[ref].id.get_offset(), f[ref].id.get_storage_size()
    with open(p, "r+b") as fh:
        fh.seek(off)
        fh.write(byte * size)


def _on_disk(name, what, ref, byte):
    """model-devi with dataset ``ref`` overwritten on disk with ``byte`` bytes."""

    def run(tmp):
        _overwrite(_copy(tmp, name, (what, ref)), ref, byte)
        return _model_devi(tmp, name)

    return run


def _h5(name, what, ref, make):
    """model-devi with dataset ``ref`` replaced by ``make(file, ref, old array)`` (h5py)."""

    def run(tmp):
        import h5py
        import numpy as np

        p = _copy(tmp, name, (what, ref))
        with h5py.File(p, "r+") as f:
            old = np.array(f[ref])
            del f[ref]
            make(f, ref, old)
        return _model_devi(tmp, name)

    return run


def _damaged_chunk(tmp):
    """The fitting weights stored gzip-compressed, then the compressed bytes damaged on disk."""
    import h5py
    import numpy as np

    p = _copy(tmp, "chunk.dp", ("fitting 0 0 w", W_FIT))
    with h5py.File(p, "r+") as f:
        old = np.array(f[W_FIT])
        del f[W_FIT]
        f.create_dataset(W_FIT, data=old, chunks=old.shape, compression="gzip")
    with h5py.File(p, "r") as f:
        off = f[W_FIT].id.get_chunk_info(0).byte_offset
    with open(p, "r+b") as fh:
        fh.seek(off + 2)
        fh.write(b"\x00\xff" * 16)
    return _model_devi(tmp, "chunk.dp")


def _truncated(tmp):
    p = _copy(tmp, "cut.dp")
    p.write_bytes(p.read_bytes()[:5000])
    return _model_devi(tmp, "cut.dp")


def _no_rcut(tmp):
    import h5py

    p = _copy(tmp, "norcut.dp")
    with h5py.File(p, "r+") as f:
        root = json.loads(f.attrs["json"])
        del root["model"]["descriptor"]["rcut"]
        f.attrs["json"] = json.dumps(root)
    return _model_devi(tmp, "norcut.dp")


def _explore_auto(tmp):
    """dpsnake explore (engine auto) with a model whose weights were overwritten with 0xff."""
    _overwrite(_copy(tmp, "ff.dp", ("fitting 0 0 w", W_FIT)), W_FIT, b"\xff")
    good = _copy(tmp, "good.dp").name
    (tmp / "walkers.json").write_text(
        json.dumps(
            [
                {
                    "name": "w0",
                    "structure": _frames(tmp),
                    "ensemble": "nvt",
                    "temperature": 300,
                    "nsteps": 10,
                    "dt": 0.002,
                    "trj_freq": 5,
                    "seed": 1,
                }
            ]
        )
    )
    return dpsnake(
        "explore",
        "--models",
        "ff.dp",
        good,
        "--walkers",
        "walkers.json",
        "--outdir",
        "out",
        "--device",
        "cpu",
        "--no-progress",
        cwd=tmp,
    )


PROBES = [
    # item 4: weights overwritten with 0xff bytes on disk (read as NaN): no NaN deviations, no exit 0
    Probe(
        "model-weights-0xff",
        _on_disk("ff.dp", "fitting 0 0 w", W_FIT, b"\xff"),
        f"ff.dp: {W_FIT} (fitting net 0 layer 0 w): 256 of 256 values are not finite (NaN/inf)",
    ),
    Probe(
        "model-weights-0x7f",
        _on_disk("big.dp", "embedding 0 1 w", W_EMB, b"\x7f"),
        f"big.dp: {W_EMB} (embedding net 0 layer 1 w): values up to",
    ),
    Probe(
        "explore-weights-0xff",
        _explore_auto,
        f"ff.dp: {W_FIT} (fitting net 0 layer 0 w): 256 of 256 values are not finite",
    ),
    # item 4: shape mismatches, unreadable arrays and groups, damaged files
    Probe(
        "model-shape-mismatch",
        _h5("shape.dp", "embedding 0 1 w", W_EMB, lambda f, n, old: f.create_dataset(n, data=old[:3])),
        f"shape.dp: {W_EMB} (embedding net 0 layer 1 w): shape (3, 8), expected (4, 8)",
    ),
    Probe(
        "model-array-is-group",
        _h5("group.dp", "fitting 0 0 w", W_FIT, lambda f, n, old: f.create_group(n)),
        f"group.dp: {W_FIT} (fitting net 0 layer 0 w): an HDF5 group, not an array",
    ),
    Probe(
        "model-array-missing",
        _h5("missing.dp", "fitting 0 0 w", W_FIT, lambda f, n, old: None),
        f"missing.dp: {W_FIT} (fitting net 0 layer 0 w): missing from the HDF5 file",
    ),
    Probe(
        "model-dstd-zero",
        _h5("dstd.dp", "dstd 0 0 0", DSTD, lambda f, n, old: f.create_dataset(n, data=0 * old)),
        f"dstd.dp: {DSTD} (descriptor dstd): 160 of 160 values are below 1e-12 in magnitude",
    ),
    Probe("model-damaged-chunk", _damaged_chunk, f"chunk.dp: {W_FIT} (fitting net 0 layer 0 w): cannot read ("),
    Probe(
        "model-truncated",
        _truncated,
        "cut.dp: not a readable HDF5 .dp model file (Unable to synchronously open file (truncated file",
    ),
    Probe(
        "model-json-no-rcut",
        _no_rcut,
        "norcut.dp: malformed model description in the 'json' attribute (KeyError: 'rcut')",
    ),
    # a frame the models turn into NaN is named, not written as a NaN row
    Probe(
        "model-devi-overlapping-atoms",
        lambda tmp: _model_devi(tmp, "good.dp", _frames(tmp, "over.extxyz", 2)),
        "system: over.extxyz: frame 2: energies or forces are not finite (NaN/inf)",
    ),
    # item 7: frames without atoms (the deviation is a max over atoms; DeePMD-kit fails too)
    Probe(
        "model-devi-no-atoms",
        lambda tmp: _model_devi(tmp, "good.dp", _frames(tmp, "empty.extxyz", natoms=0)),
        "system: empty.extxyz: frames without atoms",
    ),
]
