"""se_atten(_v2) on CuPy equals NumPy (one code path): FP64 to 1e-12, mixed precision to 1e-5, for
attn_layer 0 and 2, concat and strip, exclusions; a second call (bin grid reused on the device) too.
Skipped without CuPy or a CUDA device (CI); the models train on the CPU (tests/dpmodels.py)."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import cupy_or_skip, rel_err

cp = cupy_or_skip()

from test_engine_attn import attn_model, flat, systems  # noqa: E402

from dpsnake.engine.attn.ensemble import AttnEnsemble  # noqa: E402

KEYS = ("energy", "force", "virial", "atom_energy", "atom_virial")


@pytest.mark.parametrize("name", ["v2_l0", "v2_l2", "concat_l2", "strip_l2", "excl", "al3"])
@pytest.mark.parametrize("precision", ["double", "mixed"])
def test_cupy_equals_numpy(model_cache, name, precision):
    m = attn_model(model_cache, name)
    tol = 1e-12 if precision == "double" else 1e-5
    ens_np = AttnEnsemble([str(m["dp"])], precision=precision)
    ens_cp = AttnEnsemble([str(m["dp"])], precision=precision)
    ats = systems(ens_np.type_map)
    args = flat(ats, ens_np.type_map)
    with pytest.warns(RuntimeWarning):
        ref = ens_np.evaluate(*args, atomic=True)
    for call in range(2):  # the second call reuses the bin grid on the device
        with pytest.warns(RuntimeWarning):
            out = ens_cp.evaluate(*(cp.asarray(a) for a in args), atomic=True)
        assert ens_cp.last_overflow == ens_np.last_overflow
        for k in KEYS:
            assert isinstance(out[k], cp.ndarray)
            err = rel_err(cp.asnumpy(out[k]), ref[k])
            print(name, precision, call, k, f"{err:.1e}")
            assert err <= tol, (k, err)


def test_cupy_ensemble_of_two_with_model_indices(model_cache):
    a, b = (str(attn_model(model_cache, n)["dp"]) for n in ("v2_l2", "excl"))
    ens = AttnEnsemble([a, b])
    ats = systems(ens.type_map)[:4]
    args = flat(ats, ens.type_map)
    ref = AttnEnsemble([a, b]).evaluate(*args)
    out = ens.evaluate(*(cp.asarray(x) for x in args), model_indices=[0, 1])
    for k in ("energy", "force", "virial"):
        assert rel_err(cp.asnumpy(out[k]), ref[k]) <= 1e-12, k
    assert np.isfinite(cp.asnumpy(out["force"])).all()


@pytest.mark.parametrize("name", ["v2_l0", "v2_l2", "strip_l2", "excl"])
def test_cupy_left_out_slots_equal_numpy_all_slots(model_cache, name):
    """Chunks of 3 centres running only their first slots (row kernels with NPAD, the last call's slot
    counts reused on the device in the second call) equal NumPy on every slot (compact False)."""
    from dpsnake.engine.settings import EngineSettings

    dp = str(attn_model(model_cache, name)["dp"])
    args = flat(systems(["Cu", "Ni"])[:4], ["Cu", "Ni"])
    ref = AttnEnsemble([dp], settings=EngineSettings(compact=False)).evaluate(*args, atomic=True)
    ens = AttnEnsemble([dp], chunk_atoms=3)
    for call in range(2):
        out = ens.evaluate(*(cp.asarray(a) for a in args), atomic=True)
        for k in KEYS:
            assert rel_err(cp.asnumpy(out[k]), ref[k]) <= 1e-12, (call, k)
    assert ens.width_misses == 0 and ens._widths and min(ens._widths.values()) < 48


@pytest.mark.parametrize("name", ["v2_l2", "strip_l2", "concat_l2", "excl", "al3"])
def test_cupy_fused_core_equals_numpy(model_cache, monkeypatch, name):
    """The fused FP64 attention core (family attn_core, opt-in, cuda/attn_core.py) = NumPy to 1e-12,
    and it ran (its forward counted)."""
    import warnings

    from dpsnake.engine.cuda import attn_core
    from dpsnake.engine.settings import FAMILIES, EngineSettings

    calls, fwd = [], attn_core.forward
    monkeypatch.setattr(attn_core, "forward", lambda *a, **k: calls.append(1) or fwd(*a, **k))
    dp = str(attn_model(model_cache, name)["dp"])
    ens_np = AttnEnsemble([dp])
    ens_cp = AttnEnsemble([dp], settings=EngineSettings(fast=frozenset(FAMILIES)))
    args = flat(systems(ens_np.type_map), ens_np.type_map)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the over-full neighbour lists of systems()
        ref = ens_np.evaluate(*args, atomic=True)
        out = ens_cp.evaluate(*(cp.asarray(a) for a in args), atomic=True)
    assert calls, "the fused core did not run"
    for k in KEYS:
        assert rel_err(cp.asnumpy(out[k]), ref[k]) <= 1e-12, k


def test_tf32_context_covers_batched_matmul():
    """EngineContext.tf32 puts 3-D FP32 cupy.matmul on TF32 too (cuBLAS math mode: CuPy's compute type
    reaches only its 2-D products) and leaves both switches as it found them."""
    from cupy._core import _routines_linalg as linalg
    from cupy_backends.cuda.libs import cublas

    from dpsnake.engine.settings import EngineContext, EngineSettings

    rng = np.random.default_rng(0)
    a64, b64 = rng.normal(size=(64, 88, 128)), rng.normal(size=(64, 128, 88))
    ref = a64 @ b64
    a, b = cp.asarray(a64, dtype=cp.float32), cp.asarray(b64, dtype=cp.float32)
    handle = cp.cuda.device.get_cublas_handle()
    mode, ctype = cublas.getMathMode(handle), linalg.get_compute_type(np.float32)
    plain = cp.asnumpy(cp.matmul(a, b))
    with EngineContext(EngineSettings(tf32=True)).tf32(cp, np.float32):
        tf32 = cp.asnumpy(cp.matmul(a, b))
        flat = cp.asnumpy(a[0] @ b[0])  # 2-D: CuPy's compute type
    assert cublas.getMathMode(handle) == mode and linalg.get_compute_type(np.float32) == ctype
    e_plain, e_tf32, e_flat = rel_err(plain, ref), rel_err(tf32, ref), rel_err(flat, ref[0])
    print(f"3-D FP32 {e_plain:.1e}, 3-D TF32 {e_tf32:.1e}, 2-D TF32 {e_flat:.1e}")
    # FP32 sums of 128 products: ~1e-7; TF32 rounds the inputs to 10 mantissa bits: ~1e-4
    assert e_plain < 1e-5 and 1e-5 < e_tf32 < 1e-2 and 1e-5 < e_flat < 1e-2
    assert np.array_equal(cp.asnumpy(cp.matmul(a, b)), plain)  # off again


@pytest.mark.parametrize("name", ["v2_l2", "concat_l2"])
def test_cupy_tf32_mixed(model_cache, monkeypatch, name):
    """settings.tf32 with mixed precision on the cuBLAS path (without the family attn_layer, whose whole-layer
    kernels otherwise run the attention where tf32 is on: next test): the attention's batched products ask cuBLAS
    for TF32 (bmm called with tf32), results move off plain FP32 (TF32 rounds inputs to 10 mantissa bits: it ran)
    and stay within 5e-3 of the FP64 NumPy reference (relative to the largest value; the measured errors print and
    go to docs/benchmarks.md)."""
    import warnings

    from dpsnake.engine.cuda import bmm as bmm_mod
    from dpsnake.engine.settings import DEFAULT_FAST, EngineSettings

    flags, inner = [], bmm_mod.bmm
    monkeypatch.setattr(bmm_mod, "bmm", lambda *a, **k: flags.append(k.get("tf32", False)) or inner(*a, **k))
    dp = str(attn_model(model_cache, name)["dp"])
    args = flat(systems(["Cu", "Ni"]), ["Cu", "Ni"])
    dev = [cp.asarray(a) for a in args]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the over-full neighbour lists of systems()
        ref = AttnEnsemble([dp]).evaluate(*args)
        fp32 = AttnEnsemble([dp], precision="mixed").evaluate(*dev)
        assert flags and not any(flags)
        flags.clear()
        blas = EngineSettings(fast=DEFAULT_FAST - {"attn_layer"}, tf32=True)
        tf32 = AttnEnsemble([dp], precision="mixed", settings=blas).evaluate(*dev)
    assert flags and all(flags), "the batched products did not ask for TF32"
    for k in ("energy", "force", "virial"):
        e32, etf = rel_err(cp.asnumpy(fp32[k]), ref[k]), rel_err(cp.asnumpy(tf32[k]), ref[k])
        moved = rel_err(cp.asnumpy(tf32[k]), cp.asnumpy(fp32[k]))
        print(name, k, f"mixed {e32:.1e}  mixed+tf32 {etf:.1e}  tf32 vs mixed {moved:.1e}")
        assert e32 <= 1e-4 and etf <= 5e-3, k
    assert rel_err(cp.asnumpy(tf32["force"]), cp.asnumpy(fp32["force"])) > 1e-6, "TF32 changed nothing"


def _spy_layer(monkeypatch, what):
    """A list that gets ``what(fn, kwargs)`` for each call of cuda/attn_layer.py's forward and backward."""
    from dpsnake.engine.cuda import attn_layer

    seen = []
    for fn in ("forward", "backward"):
        inner = getattr(attn_layer, fn)
        monkeypatch.setattr(attn_layer, fn, lambda *a, _f=inner, _n=fn, **k: seen.append(what(_n, k)) or _f(*a, **k))
    return seen


def _cu_ni(model_cache, name):
    """The model file and systems() of Cu and Ni as flat NumPy arrays and on the device."""
    args = flat(systems(["Cu", "Ni"]), ["Cu", "Ni"])
    return str(attn_model(model_cache, name)["dp"]), args, [cp.asarray(a) for a in args]


@pytest.mark.parametrize("name", ["v2_l2", "concat_l2", "strip_l2", "excl"])
def test_cupy_tf32_layer_kernels(model_cache, monkeypatch, name):
    """mixed + TF32 with the whole-layer kernels (cuda/attn_layer.py, family attn_layer, opt-in): they run (forward
    and backward of every layer), and energy, forces, virial stay as close to the FP64 NumPy reference as the
    cuBLAS TF32 path's (within 5e-3 relative to the largest value; both errors print)."""
    import warnings

    from dpsnake.engine.settings import DEFAULT_FAST, EngineSettings

    calls = _spy_layer(monkeypatch, lambda fn, k: fn)
    dp, args, dev = _cu_ni(model_cache, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the over-full neighbour lists of systems()
        ref = AttnEnsemble([dp]).evaluate(*args, atomic=True)
        blas = EngineSettings(fast=DEFAULT_FAST - {"attn_layer"}, tf32=True)
        tf32_blas = AttnEnsemble([dp], precision="mixed", settings=blas).evaluate(*dev, atomic=True)
        assert not calls
        on = EngineSettings(fast=DEFAULT_FAST | {"attn_layer"}, tf32=True)
        layer = AttnEnsemble([dp], precision="mixed", settings=on).evaluate(*dev, atomic=True)
    assert "forward" in calls and "backward" in calls, "the layer kernels did not run"
    for k in KEYS:
        e_blas, e_layer = rel_err(cp.asnumpy(tf32_blas[k]), ref[k]), rel_err(cp.asnumpy(layer[k]), ref[k])
        print(name, k, f"cuBLAS TF32 {e_blas:.1e}  layer kernels {e_layer:.1e}")
        assert e_layer <= 5e-3 and e_layer <= 1.5 * e_blas + 1e-7, k  # session 31, H100: 0.86-1.10x


@pytest.mark.parametrize("name", ["v2_l2", "concat_l2"])
@pytest.mark.parametrize(
    "setting,extra,tol",
    [("attn_ex2", (("EX2", 1),), 1e-4), ("attn_xhat16", (("EX2", 1), ("XH", 1)), 1e-3),
     ("attn_prefetch", (("EX2", 1), ("PREF", 1)), 1e-6)],
)  # fmt: skip
def test_cupy_layer_kernel_settings(model_cache, monkeypatch, name, setting, extra, tol):
    """Kernel settings of the layer kernels against the same build without them: attn_ex2 (the default: the
    softmax on ex2.approx), attn_xhat16 (xhat kept in FP16, off) and attn_prefetch (the forward's next centre's x
    toward L2, off; the same results but for the atomics' order): the constants reach forward and backward;
    energy, forces, virial within ``tol`` of the build without (relative to the largest value) and 5e-3 of the FP64
    NumPy reference (both errors print)."""
    import warnings

    from dpsnake.engine.settings import EngineSettings

    seen = _spy_layer(monkeypatch, lambda fn, k: k.get("extra"))
    dp, args, dev = _cu_ni(model_cache, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the over-full neighbour lists of systems()
        ref = AttnEnsemble([dp]).evaluate(*args, atomic=True)
        off = EngineSettings(tf32=True, **{setting: False})
        a = AttnEnsemble([dp], precision="mixed", settings=off).evaluate(*dev, atomic=True)
        assert seen and all(e != extra for e in seen)
        seen.clear()
        b = AttnEnsemble([dp], precision="mixed", settings=EngineSettings(tf32=True, **{setting: True}))
        b = b.evaluate(*dev, atomic=True)
    assert seen and all(e == extra for e in seen), seen
    for k in KEYS:
        e_a, e_b = rel_err(cp.asnumpy(a[k]), ref[k]), rel_err(cp.asnumpy(b[k]), ref[k])
        print(name, setting, k, f"without {e_a:.1e}  with {e_b:.1e}")
        assert rel_err(cp.asnumpy(b[k]), cp.asnumpy(a[k])) <= tol and e_b <= 5e-3, k


@pytest.mark.parametrize("name", ["v2_l2", "strip_l2", "excl", "v2_l0"])
def test_cupy_strip_net_kernels(model_cache, monkeypatch, name):
    """The strip-mode net + gate kernels run forward and backward, and equal the array code (fused "off"):
    cuda/strip_net.py's with the fused nets (FP32 by default, FP64 with fused "on") to 1e-12 (FP64) and 1e-5
    (mixed, also with settings.tf32); cuda/strip_net_tc.py's with settings.tf32 and strip_tc (TF32 products, as
    the array code's cuBLAS GEMMs then) to 2e-3. The errors print."""
    import warnings

    from dpsnake.engine.cuda import strip_net, strip_net_tc
    from dpsnake.engine.settings import EngineSettings

    calls = []

    def spy(fn):  # on the base class: StripNetTC inherits forward / backward
        inner = getattr(strip_net.StripNet, fn)

        def wrapped(self, *a, **k):
            calls.append(f"{type(self).__name__}.{fn}")
            return inner(self, *a, **k)

        return wrapped

    assert issubclass(strip_net_tc.StripNetTC, strip_net.StripNet)
    for fn in ("forward", "backward"):
        monkeypatch.setattr(strip_net.StripNet, fn, spy(fn))
    dp = str(attn_model(model_cache, name)["dp"])
    dev = [cp.asarray(a) for a in flat(systems(["Cu", "Ni"]), ["Cu", "Ni"])]
    cases = (("double", {"fused": "on"}, 1e-12, "StripNet"), ("mixed", {}, 1e-5, "StripNet"),
             ("mixed", {"tf32": True}, 2e-3, "StripNet"), ("mixed", {"tf32": True, "strip_tc": True}, 2e-3, "StripNetTC"))  # fmt: skip
    for precision, kw, tol, cls in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the over-full neighbour lists of systems()
            off = AttnEnsemble([dp], precision=precision, settings=EngineSettings(**{**kw, "fused": "off"}))
            ref = off.evaluate(*dev, atomic=True)
            assert not calls
            on = AttnEnsemble([dp], precision=precision, settings=EngineSettings(**{"fused": "auto", **kw}))
            out = on.evaluate(*dev, atomic=True)
        assert sorted(set(calls)) == [f"{cls}.backward", f"{cls}.forward"], (precision, kw, calls)
        calls.clear()
        for k in KEYS:
            err = rel_err(cp.asnumpy(out[k]), cp.asnumpy(ref[k]))
            print(name, precision, kw, k, f"{cls} vs array code {err:.1e}")
            assert err <= tol, (precision, kw, k, err)
