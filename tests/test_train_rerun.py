"""`dpsnake train` after a killed attempt (issue 19 item 1) and when DeePMD-kit fails (issue 19 item 2),
with real DeePMD-kit training (TensorFlow backend, a tiny model, a few steps)."""

from __future__ import annotations

import json
import uuid

from dpmodels import emt_dataset
from test_train_continue import _cfg, _train


def _killed_checkpoint_write(folder, step: int) -> list:
    """The files a TensorFlow checkpoint write killed half-way leaves (names as TensorFlow makes them):
    the meta graph and the `checkpoint` index written through file_io.atomic_write_string_to_file
    (`<name>.tmp<uuid hex>`), the tensor bundle's `<prefix>.index` / `.data-*` as `*.tempstate<n>`, a
    sharded save's `<prefix>_temp/` folder; and our own outputs of a killed freeze/convert."""
    prefix = folder / f"model.ckpt-{step}"
    made = [
        folder / f"model.ckpt-{step}.meta.tmp{uuid.uuid4().hex}",  # matches model.ckpt* and *.tmp*
        folder / f"checkpoint.tmp{uuid.uuid4().hex}",
        folder / f"model.ckpt-{step}.index.tempstate1234567890",
        folder / f"model.ckpt-{step}.data-00000-of-00001.tempstate1234567890",
        folder / "frozen_model.tmp.pb",
        folder / "model.tmp.dp",
    ]
    for p in made:
        p.write_bytes(b"\0" * 64)
    shard = folder / f"{prefix.name}_temp"
    shard.mkdir()
    (shard / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0")
    return made + [shard]


def test_rerun_after_a_kill_during_a_checkpoint_write(tmp_path, model_cache):
    """The first rerun after the kill completes (the stale files are removed once, in one pass)."""
    data = [emt_dataset(model_cache, "Cu")]
    cfg = _cfg(tmp_path, "tf")
    out = tmp_path / "model.0"
    _train(cfg, 0, out, data)
    (out / "model.dp").unlink()  # the job did not finish: Snakemake reruns it
    stale = _killed_checkpoint_write(out, 6)
    p = _train(cfg, 0, out, data)
    assert "train: wrote" in p.stdout
    assert not any(s.exists() for s in stale)
    assert (out / "model.ckpt.index").exists() and (out / "frozen_model.pb").exists()


def test_a_deepmd_failure_ends_with_its_cause(tmp_path, model_cache):
    """`dp train` fails inside `dpsnake train`: the last line names DeePMD-kit's exception, not the
    command."""
    data = [emt_dataset(model_cache, "Cu")]
    prev = tmp_path / "prev"
    prev.mkdir()
    # a previous model folder without its frozen model: DeePMD-kit itself stops (--init-frz-model)
    (prev / "input.json").write_text(json.dumps({"training": {"numb_steps": 6}}))
    cfg = _cfg(tmp_path, "tf")  # init_lr_schedule: reset
    p = _train(cfg, 1, tmp_path / "model.0", data, init_from=prev, ok=False)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("dpsnake train: error: dp train: RuntimeError: The input frozen model "), last
    assert "does not exist" in last and "frozen_model.pb" in last
    # continuing needs the previous checkpoint: said before DeePMD-kit starts
    p = _train(
        _cfg(tmp_path, "tf", init_lr_schedule="continue"), 1, tmp_path / "model.1", data, init_from=prev, ok=False
    )
    last = p.stderr.strip().splitlines()[-1]
    assert "no such checkpoint" in last and "model.ckpt.index" in last, last
