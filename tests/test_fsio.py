"""dpsnake.fsio: the one atomic-write helper. A write that fails half-way leaves the old file (or folder)
as it was and no temporary file behind; a write that succeeds replaces it whole."""

import json
import os

import numpy as np
import pytest

from dpsnake import fsio


class Boom(Exception):
    pass


def _left(folder):
    """Everything in ``folder`` but the files a test named (temporary names start with a dot)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_text_bytes_json_replace_whole(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    fsio.write_text_atomic(p, "one\n")  # the folder is made
    fsio.write_text_atomic(p, "two\n")
    assert p.read_text() == "two\n"
    fsio.write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    fsio.write_json_atomic(tmp_path / "c.json", {"x": np.float64(1.5), "a": np.arange(2), "n": np.int64(3)})
    text = (tmp_path / "c.json").read_text()
    assert text.endswith("\n") and json.loads(text) == {"x": 1.5, "a": [0, 1], "n": 3}
    fsio.write_text_atomic(tmp_path / "d.txt", "durable", fsync=True)
    assert (tmp_path / "d.txt").read_text() == "durable"
    assert _left(tmp_path) == [] and _left(tmp_path / "sub") == []


def test_permissions_follow_the_umask(tmp_path):
    fsio.write_text_atomic(tmp_path / "a", "x")
    (tmp_path / "b").write_text("x")
    assert (tmp_path / "a").stat().st_mode & 0o777 == (tmp_path / "b").stat().st_mode & 0o777


@pytest.mark.parametrize("how", ["open", "path", "json"])
def test_failed_write_keeps_the_old_file(tmp_path, how):
    p = tmp_path / "f.txt"
    p.write_text("old\n")
    with pytest.raises((Boom, TypeError)):
        if how == "open":
            with fsio.open_atomic(p) as f:
                f.write("half of the new")
                raise Boom
        elif how == "path":
            with fsio.atomic_path(p, ".extxyz") as tmp:
                assert tmp.parent == p.parent and tmp.name.endswith(".extxyz")
                tmp.write_text("half of the new")
                raise Boom
        else:
            fsio.write_json_atomic(p, {"not json": object()})
    assert p.read_text() == "old\n"
    assert _left(tmp_path) == []


def test_failed_write_of_a_new_file_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with fsio.open_atomic(tmp_path / "new.bin", "wb") as f:
            np.savez(f, a=np.zeros(3))
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_takes_writers_that_want_a_name(tmp_path):
    import ase
    import ase.io

    p = tmp_path / "frame.extxyz"
    with fsio.atomic_path(p, ".extxyz") as tmp:
        ase.io.write(tmp, ase.Atoms("Cu", positions=[[0, 0, 0]], cell=[3, 3, 3], pbc=True), format="extxyz")
        assert not p.exists()  # nothing under the final name until the block ends
    assert ase.io.read(p).get_chemical_symbols() == ["Cu"]
    with fsio.atomic_path(tmp_path / "ck.npz", fsync=True) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, a=np.arange(3))
    assert np.load(tmp_path / "ck.npz")["a"].tolist() == [0, 1, 2]
    assert _left(tmp_path) == []


def test_open_atomic_refuses_other_modes(tmp_path):
    with pytest.raises(ValueError):
        with fsio.open_atomic(tmp_path / "x", "a"):
            pass


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "data"
    with fsio.atomic_dir(out) as tmp:
        (tmp / "one").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["one"]
    with pytest.raises(Boom):
        with fsio.atomic_dir(out) as tmp:
            (tmp / "two").write_text("2")
            raise Boom
    assert sorted(p.name for p in out.iterdir()) == ["one"]  # the old folder, untouched
    with fsio.atomic_dir(out) as tmp:
        (tmp / "three").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["three"]  # replaced, not merged
    assert _left(tmp_path) == []


def test_temp_dir_for_removes_what_a_killed_attempt_left(tmp_path):
    out = tmp_path / "data"
    stale = tmp_path / ".data.tmp12345"
    (stale / "half").mkdir(parents=True)
    tmp = fsio.temp_dir_for(out)
    assert not stale.exists() and tmp.is_dir() and tmp.name == f".data.tmp{os.getpid()}"
    fsio.replace_dir(tmp, out)
    assert out.is_dir() and _left(tmp_path) == []
