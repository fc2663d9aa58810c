"""Tabulated se_atten strip mode on CuPy equals NumPy: attn_layer 0 runs the CUDA kernels of
cuda/tab.py (STRIP: G in registers), attn_layer 2 those of cuda/strip_tab.py (G written for the
attention); FP64 to 1e-12, mixed precision to 1e-5. Skipped without CuPy or a CUDA device (CI);
the models train on the CPU."""

from __future__ import annotations

import pytest
from engine_helpers import cupy_or_skip, rel_err

cp = cupy_or_skip()

from test_engine_attn_tabulate import _flat, _model, _systems  # noqa: E402

from dpsnake.engine.attn.ensemble import AttnEnsemble  # noqa: E402

KEYS = ("energy", "force", "virial", "atom_energy", "atom_virial")


@pytest.mark.parametrize("layers", [0, 2])
@pytest.mark.parametrize("precision", ["double", "mixed"])
def test_cupy_equals_numpy_compressed(model_cache, layers, precision):
    m = _model(model_cache, layers)
    comp = {"min_nbor_dist": 2.0, "stride": 0.05}
    tol = 1e-12 if precision == "double" else 1e-5
    args = _flat(_systems())
    ref = AttnEnsemble([str(m["dp"])], precision=precision, compress=comp).evaluate(*args, atomic=True)
    ens = AttnEnsemble([str(m["dp"])], precision=precision, compress=comp)
    for call in range(2):  # the second call reuses the bin grid on the device
        out = ens.evaluate(*(cp.asarray(a) for a in args), atomic=True)
        rt = ens._rt(cp, 0)
        assert (rt.tab is not None) == (layers == 0)  # the kernels run exactly without attention
        assert (type(rt.strip_net).__name__ == "StripTab") == (layers == 2)  # with attention: G from strip_tab
        for k in KEYS:
            err = rel_err(cp.asnumpy(out[k]), ref[k])
            print(layers, precision, call, k, f"{err:.1e}")
            assert err <= tol, (k, err)


def test_kernels_off_gives_the_array_code(model_cache):
    """settings tab_kernels off: the array code from the table on the device, same numbers."""
    from dpsnake.engine.settings import EngineSettings

    m = _model(model_cache, 0)
    comp = {"min_nbor_dist": 2.0}
    args = [cp.asarray(a) for a in _flat(_systems(2))]
    on = AttnEnsemble([str(m["dp"])], compress=comp).evaluate(*args)
    off = AttnEnsemble([str(m["dp"])], compress=comp, settings=EngineSettings(tab_kernels=False)).evaluate(*args)
    for k in ("energy", "force", "virial"):
        assert rel_err(cp.asnumpy(on[k]), cp.asnumpy(off[k])) <= 1e-12, k
