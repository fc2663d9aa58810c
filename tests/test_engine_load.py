"""Damaged ``.dp`` files (issue 19 item 4): real DeePMD-kit models with bytes overwritten on disk,
datasets replaced with h5py, files cut short. Each fails at load with one UserError line naming the
file and, where one is at fault, the array; no damage gives NaN energies or a traceback."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from dpsnake.engine.model import load_model
from dpsnake.engine.validate import DamagedModelError
from dpsnake.errors import UserError


@pytest.fixture(scope="module")
def good(cu_model):
    return str(cu_model["dp"])


def _refs(path) -> dict:
    """{what the loader calls the array: dataset path} of a .dp file, from its JSON."""
    with h5py.File(path, "r") as f:
        m = json.loads(f.attrs["json"])["model"]
    out = {
        "descriptor davg": m["descriptor"]["@variables"]["davg"],
        "descriptor dstd": m["descriptor"]["@variables"]["dstd"],
        "fitting bias_atom_e": m["fitting"]["@variables"]["bias_atom_e"],
        "model out_bias": m["@variables"]["out_bias"],
        "model out_std": m["@variables"]["out_std"],
    }  # not used by the engine, checked all the same
    for kind, nets in (
        ("embedding", m["descriptor"]["embeddings"]["networks"]),
        ("fitting", m["fitting"]["nets"]["networks"]),
    ):
        for k, net in enumerate(nets):
            for j, layer in enumerate(net["layers"]):
                for v, ref in layer["@variables"].items():
                    if ref is not None:
                        out[f"{kind} net {k} layer {j} {v}"] = ref
    return out


def _fails(path, *words) -> str:
    with pytest.raises(UserError) as err:
        load_model(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    assert isinstance(err.value, DamagedModelError)  # not "unsupported": no other engine reads it either
    for w in words:
        assert w in msg, msg
    return msg


def _overwrite(src, dst, ref, byte: bytes) -> str:
    """Copy ``src`` and overwrite the stored bytes of dataset ``ref`` on disk with ``byte``."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r") as f:
        off, size = f[ref].id.get_offset(), f[ref].id.get_storage_size()
    with open(dst, "r+b") as fh:
        fh.seek(off)
        fh.write(byte * size)
    return str(dst)


def _replace(src, dst, ref, make) -> str:
    """Copy ``src`` with dataset ``ref`` replaced by ``make(h5file, name, old array)``."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        old = np.array(f[ref])
        del f[ref]
        make(f, ref, old)
    return str(dst)


def test_every_array_overwritten_with_0xff_names_it(good, tmp_path):
    """0xff bytes read as NaN: every array of the model, one at a time."""
    refs = _refs(good)
    assert len(refs) == 16
    for what, ref in refs.items():
        p = _overwrite(good, tmp_path / "ff.dp", ref, b"\xff")
        _fails(p, f"{ref} ({what})", "not finite (NaN/inf)")


def test_float32_model_0xff(dp_model, tmp_path):
    m = dp_model(
        {
            "model": {
                "descriptor": {"type_one_side": True, "precision": "float32", "exclude_types": [[1, 1]]},
                "fitting_net": {"precision": "float32"},
            }
        },
        data="CuNi",
    )
    ref = _refs(m["dp"])["fitting net 1 layer 2 w"]
    _fails(_overwrite(m["dp"], tmp_path / "ff32.dp", ref, b"\xff"), f"{ref} (fitting net 1 layer 2 w)", "not finite")


def test_values_no_trained_model_has(good, tmp_path):
    refs = _refs(good)
    # 0x7f bytes: finite (~1e304) but overflowing in the nets
    _fails(
        _overwrite(good, tmp_path / "big.dp", refs["embedding net 0 layer 1 b"], b"\x7f"),
        f"{refs['embedding net 0 layer 1 b']} (embedding net 0 layer 1 b)",
        "in magnitude",
    )
    # dstd divides the environment matrix
    p = _replace(
        good,
        tmp_path / "dstd0.dp",
        refs["descriptor dstd"],
        lambda f, n, old: f.create_dataset(
            n, data=np.where(np.arange(old.size) % 7 == 0, 0.0, old.ravel()).reshape(old.shape)
        ),
    )
    _fails(p, f"{refs['descriptor dstd']} (descriptor dstd)", "below 1e-12 in magnitude (it divides)")


@pytest.mark.parametrize(
    "what,shape,words",
    [
        ("embedding net 0 layer 1 w", (5, 8), "shape (5, 8), expected (4, 8)"),
        ("embedding net 0 layer 1 w", (4, 6), "shape (4, 6), expected (4, 8)"),
        ("fitting net 0 layer 0 w", (33, 8), "shape (33, 8), expected (32, 8)"),
        ("fitting net 0 layer 1 b", (9,), "shape (9,), expected (8,)"),
        ("fitting net 0 layer 1 idt", (7,), "shape (7,), expected (8,)"),
        ("fitting net 0 layer 2 w", (8, 2), "shape (8, 2), expected (8, 1)"),
        ("embedding net 0 layer 0 w", (8,), "shape (8,), expected (1, 4)"),
        ("descriptor davg", (1, 39, 4), "shape (1, 39, 4), expected (1, 40, 4)"),
        ("fitting bias_atom_e", (2, 1), "shape (2, 1), expected (1, 1)"),
        ("model out_bias", (1, 1, 2), "shape (1, 1, 2), expected (1, 1, 1)"),
    ],
)
def test_shape_mismatch_names_the_array(good, tmp_path, what, shape, words):
    ref = _refs(good)[what]
    p = _replace(good, tmp_path / "shape.dp", ref, lambda f, n, old: f.create_dataset(n, data=np.full(shape, 0.1)))
    _fails(p, f"{ref} ({what})", words)


def test_unreadable_arrays(good, tmp_path):
    refs = _refs(good)
    ref = refs["fitting net 0 layer 0 w"]
    name = f"{ref} (fitting net 0 layer 0 w)"
    _fails(
        _replace(good, tmp_path / "group.dp", ref, lambda f, n, old: f.create_group(n)),
        name,
        "an HDF5 group, not an array",
    )
    _fails(
        _replace(good, tmp_path / "int.dp", ref, lambda f, n, old: f.create_dataset(n, data=old.astype(int))),
        name,
        "int64 values, expected floating point",
    )
    _fails(_replace(good, tmp_path / "missing.dp", ref, lambda f, n, old: None), name, "missing from the HDF5 file")
    # a compressed dataset whose stored chunk is damaged: HDF5 cannot inflate it
    p = _replace(
        good,
        tmp_path / "chunk.dp",
        ref,
        lambda f, n, old: f.create_dataset(n, data=old, chunks=old.shape, compression="gzip"),
    )
    with h5py.File(p, "r") as f:
        off = f[ref].id.get_chunk_info(0).byte_offset
    with open(p, "r+b") as fh:
        fh.seek(off + 2)
        fh.write(b"\x00\xff" * 16)
    _fails(p, name, "cannot read (")


def test_damaged_file_and_json(good, tmp_path):
    data = open(good, "rb").read()
    (tmp_path / "cut.dp").write_bytes(data[: len(data) // 2])
    _fails(str(tmp_path / "cut.dp"), "not a readable HDF5 .dp model file", "truncated")
    (tmp_path / "zero.dp").write_bytes(b"\0" * 512 + data[512:])
    _fails(str(tmp_path / "zero.dp"), "not a readable HDF5 .dp model file")
    shutil.copy(good, tmp_path / "json.dp")
    with h5py.File(tmp_path / "json.dp", "r+") as f:
        root = json.loads(f.attrs["json"])
        del root["model"]["descriptor"]["rcut"]
        f.attrs["json"] = json.dumps(root)
    _fails(str(tmp_path / "json.dp"), "malformed model description", "'rcut'")
    with h5py.File(tmp_path / "json.dp", "r+") as f:
        f.attrs["json"] = "{not json"
    _fails(str(tmp_path / "json.dp"), "no readable 'json' attribute")


def test_bytes_overwritten_anywhere(good, tmp_path):
    """Every 64th offset of the file overwritten with 8 bytes of 0xff, 0x00 or 0x7f13: the model
    either loads and gives finite numbers (a weight changed to another plausible value), or fails
    with one line naming the file; nothing else."""
    from engine_helpers import fcc, frame

    from dpsnake import DeepPot

    c, cl, t = frame(fcc(rep=(2, 2, 2), seed=5), ["Cu"])
    data = open(good, "rb").read()
    p = tmp_path / "fuzz.dp"
    n_fail = 0
    for pat in (b"\xff" * 8, b"\x00" * 8, b"\x7f\x13" * 4):
        for off in range(0, len(data), 64):
            d = bytearray(data)
            d[off : off + 8] = pat[: len(data) - off]
            p.write_bytes(bytes(d))
            try:
                m = load_model(p)
            except UserError as err:
                assert "\n" not in str(err) and str(err).startswith(f"{p}: "), (pat, off, str(err))
                n_fail += 1
                continue
            e, f, v = DeepPot(m).eval(c, cl, t)
            assert np.isfinite(e).all() and np.isfinite(f).all() and np.isfinite(v).all(), (pat, off)
    assert n_fail > 100  # the loader did catch damage (not only harmless offsets)


def test_unsupported_is_not_damaged(good, tmp_path):
    """A readable model with a feature the engine lacks is a plain UserError (explore --engine auto
    may hand it to DeePMD-kit); damage is a DamagedModelError (no engine reads it)."""
    from engine_helpers import edit_dp

    p = edit_dp(good, tmp_path / "r.dp", lambda m: m["descriptor"].update(type="se_e2_r"))
    with pytest.raises(UserError, match="se_e2_r") as err:
        load_model(p)
    assert not isinstance(err.value, DamagedModelError)
