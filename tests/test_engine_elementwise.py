"""The fused elementwise kernels (engine/cuda/elementwise.py, CuPy ElementwiseKernels on GPUs) emulated
on the CPU: each kernel body is compiled with g++ into a loop over the broadcast elements and
substituted for the CuPy kernel, then the whole engine runs through the fused paths and is compared
with the NumPy array code (which is also the reference the GPU run checks them against)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from engine_helpers import fcc, rel_err

from dpsnake.engine.settings import EngineContext, EngineSettings

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate CUDA")

_CT = {"float64": "double", "float32": "float", "int64": "long long", "int32": "int", "bool": "bool"}


def _params(spec):
    out = []
    for p in spec.split(","):
        w = p.split()
        raw = w[0] == "raw"
        out.append((raw, w[-2], w[-1]))
    return out


class _Emulated:
    """Callable like cupy.ElementwiseKernel(in, out, body) on NumPy arrays (broadcast, T bound
    from the first array argument of type T)."""

    def __init__(self, src, tmp_path, name):
        self.ins, self.outs = _params(src[0]), _params(src[1])
        self.body, self.tmp, self.name, self.libs = src[2], tmp_path, name, {}

    def _lib(self, T):
        if T not in self.libs:
            decl = []
            for k, (raw, ty, nm) in enumerate(self.ins + self.outs):
                cty = _CT.get(ty, T)
                decl.append(f"{cty}* {nm} = ({cty}*)ptr[{k}];" if raw else f"{cty}& {nm} = (({cty}*)ptr[{k}])[i];")
            src = (
                "#include <cmath>\nusing namespace std;\n"
                "template <class X> X atomicAdd(X* a, X v) { X o = *a; *a += v; return o; }\n"
                f'typedef {T} T;\nextern "C" void run(long long n, void** ptr) {{ for (long long i = 0; i < n; ++i) {{\n'
                + "\n".join(decl)
                + "\n"
                + self.body
                + "\n} }\n"
            )
            cpp = self.tmp / f"{self.name}_{T}.cpp"
            cpp.write_text(src)
            so = cpp.with_suffix(".so")
            subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-o", str(so), str(cpp)], check=True)
            self.libs[T] = ctypes.CDLL(str(so))
        return self.libs[T]

    def __call__(self, *args):
        params = self.ins + self.outs
        assert len(args) == len(params)
        T = next(
            (
                np.asarray(a).dtype.name
                for a, (raw, ty, _) in zip(args, params)
                if ty == "T" and isinstance(a, np.ndarray)
            ),
            "float64",
        )  # a kernel without T
        T = _CT[T]
        shape = np.broadcast_shapes(*[np.shape(a) for a, (raw, _, _) in zip(args, params) if not raw])
        n = int(np.prod(shape))
        bufs, back = [], []
        for a, (raw, ty, nm) in zip(args, params):
            dt = {"double": np.float64, "float": np.float32}[T] if ty == "T" else np.dtype(ty)
            if raw:
                assert isinstance(a, np.ndarray) and a.flags.c_contiguous and a.dtype == dt, nm
                bufs.append(a)
            else:
                b = np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=dt), shape))
                bufs.append(b)
                if any(nm == o[2] for o in self.outs):
                    back.append((a, b))
        ptrs = (ctypes.c_void_p * len(bufs))(*[b.ctypes.data for b in bufs])
        self._lib(T).run(ctypes.c_longlong(n), ptrs)
        for a, b in back:
            a[...] = b


@pytest.fixture()
def emulated(tmp_path, monkeypatch):
    from dpsnake.engine.cuda import elementwise as ew

    cache = {}

    def k(name):
        if name not in cache:
            cache[name] = _Emulated(ew._SRC[name], tmp_path, name)
        return cache[name]

    monkeypatch.setattr(ew, "_k", k)
    # the families of the settings run on NumPy too (EngineSettings(fast=NONE): the array code)
    monkeypatch.setattr(EngineContext, "fast", lambda self, xp, name: name in self.settings.fast)
    # the block-per-centre descriptor kernels are RawModules (tested in test_engine_descriptor_kernels.py)
    monkeypatch.setattr(ew, "_desc_block", lambda gr, A, block: False)
    return ew


NONE = EngineSettings(fast=frozenset())  # no fused elementwise kernels: the reference


def _batch(ntypes, seed=0):
    ats = [
        fcc(rep=(2, 2, 2), seed=seed, ni_frac=0.5 if ntypes > 1 else 0.0),
        fcc(a=3.5, rep=(1, 1, 2), seed=seed + 1, cubic=False),
        fcc(rep=(2, 1, 1), seed=seed + 2),
    ]
    rng = np.random.default_rng(seed)
    coords = np.concatenate([a.positions for a in ats])
    atype = rng.integers(0, ntypes, len(coords))
    system = np.repeat(np.arange(3), [len(a) for a in ats])
    return coords, atype, system, np.array([a.cell.array for a in ats]), np.array([True, True, False])


@pytest.mark.parametrize("precision", ["double", "mixed"])
def test_fused_paths_match_array_code(cu_model, request, emulated, precision):
    from dpsnake.engine.ensemble import Ensemble

    models = [cu_model["dp"]]
    for name in ("cuni", "cuni_tos32"):  # 2 types; FP32 type_one_side with exclusions (array path)
        try:
            models.append(request.getfixturevalue(name)["dp"])
        except pytest.FixtureLookupError:
            pass
    for path in models:
        ens = Ensemble([path], precision=precision)
        args = _batch(ens.ntypes)
        got = ens.evaluate(*args)
        assert not ens.ctx.broken
        ref = Ensemble([path], precision=precision, settings=NONE).evaluate(*args)
        tol = 1e-12 if precision == "double" else 1e-5
        for k in ("energy", "force", "virial"):
            err = np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()
            assert err <= tol, (path, k, err)


@pytest.mark.parametrize("name", ["v2_l2", "strip_l2", "concat_l2", "excl", "v2_l0"])
@pytest.mark.parametrize("precision", ["double", "mixed"])
def test_attn_env_kernels_match_array_code(model_cache, emulated, monkeypatch, name, precision):
    """se_atten's env matrix and its chain rule as the family "env" kernels (attn_env_fwd / attn_env_bwd:
    attention directions, smooth gate, excluded neighbours, attn_layer 0) and its descriptor D = gr^T gr[:, :A]
    and backward as the family "desc" kernels = the array code, over the attention tests' batch (over-full,
    cluster, many images): FP64 to 1e-12, mixed to 1e-6."""
    import warnings

    from test_engine_attn import attn_model, flat, systems

    from dpsnake.engine.attn import env as attn_env
    from dpsnake.engine.attn.ensemble import AttnEnsemble

    calls, inner, desc_grad = [], attn_env.backward, emulated.descriptor_grad
    monkeypatch.setattr(emulated, "descriptor_grad", lambda *a: calls.append("desc") or desc_grad(*a))
    dp = str(attn_model(model_cache, name)["dp"])
    args = flat(systems(["Cu", "Ni"]), ["Cu", "Ni"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the over-full neighbour lists of systems()
        ref = AttnEnsemble([dp], precision=precision, settings=NONE).evaluate(*args, atomic=True)
        attn_env.backward = lambda rt, ti, env, *a: calls.append(env.kernels) or inner(rt, ti, env, *a)
        try:
            env_on = EngineSettings(fast=frozenset({"env", "desc"}), cpu_workers=1)
            got = AttnEnsemble([dp], precision=precision, settings=env_on).evaluate(*args, atomic=True)
        finally:
            attn_env.backward = inner
    assert "desc" in calls and True in calls and False not in calls, "the env or desc kernels did not run"
    tol = 1e-12 if precision == "double" else 1e-6
    for k in ("energy", "force", "virial", "atom_energy", "atom_virial"):
        assert rel_err(got[k], ref[k]) <= tol, (k, rel_err(got[k], ref[k]))


def test_fused_layer_variants(emulated):
    """Every residual shape of a tanh layer (none, x, concat(x, x)), with and without idt/bias,
    K=1 outer-product layers included, forward and backward."""
    from dpsnake.engine.nets import Layer, Net

    rng = np.random.default_rng(1)

    def lay(i, o, idt=True, b=True, res=True):
        return Layer(
            rng.normal(size=(i, o)), rng.normal(size=o) if b else None, rng.normal(size=o) if idt else None, "tanh", res
        )

    nets = [
        Net([lay(1, 2), lay(2, 4, idt=False), lay(4, 4, b=False), lay(4, 3)]),
        Net([lay(1, 1), lay(1, 5, res=False), lay(5, 10, idt=False, b=False)]),
    ]
    x = rng.normal(size=(3, 7, 1))
    ctx = EngineContext()
    for net in nets:
        y, cache = net.forward(np, x, ctx=ctx)
        gx = net.backward(np, np.ones_like(y), cache, ctx=ctx)
        y0, c0 = net.forward(np, x)  # no context: the array code
        gx0 = net.backward(np, np.ones_like(y0), c0)
        np.testing.assert_allclose(y, y0, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(gx, gx0, rtol=1e-13, atol=1e-13)


@pytest.fixture(scope="module")
def cuni(dp_model):
    return dp_model(data="CuNi")


def test_neighbour_build_kernels_match_array_code(emulated):
    """The nbr kernels (wrap, ghosts, bin keys, bin-ordered ext arrays, 27 candidate ranges) give
    the array code's ext atoms, bins and candidate sets: cubic, tiny triclinic (several images per
    direction) and non-periodic systems in one batch."""
    from dpsnake.engine.neighbor import NeighborBuilder

    coords, atype, system, cells, pbc = _batch(2, seed=3)
    cells[1] = cells[1] @ (np.eye(3) + 0.1 * np.random.default_rng(3).uniform(-1, 1, (3, 3)))
    args = (np, coords, atype, system, cells, pbc, 6.0, [40, 40])
    got = NeighborBuilder(*args)
    assert got._geo is not None and not got.ctx.broken
    ref = NeighborBuilder(*args, ctx=NONE)
    bad = coords.copy()
    bad[3] = np.nan  # a NaN atom of a periodic system: itself, no ghosts, nothing else lost
    n_nan = NeighborBuilder(np, bad, *args[2:], ctx=NONE).n_ext
    assert NeighborBuilder(np, bad, *args[2:]).n_ext == n_nan < ref.n_ext
    assert ref._geo is None and got.n_ext == ref.n_ext > 3 * len(coords)
    np.testing.assert_allclose(got.wrapped, ref.wrapped, atol=1e-12)
    np.testing.assert_array_equal(got.cbin, ref.cbin)
    np.testing.assert_array_equal(got.edges, ref.edges)

    def ext_set(nb, lo, hi):  # (owner, position) of the ext atoms in bin order positions lo:hi
        pos, own, typ, idx = nb.sorted_ext()
        return sorted((int(own[k]), int(typ[k]), *np.round(pos[k], 9)) for k in range(lo, hi))

    assert ext_set(got, 0, got.n_ext) == ext_set(ref, 0, ref.n_ext)
    g_pos, g_own, _, g_idx = got.sorted_ext()
    np.testing.assert_array_equal(g_own, got.eowner[g_idx])
    np.testing.assert_allclose(g_pos, got.epos[g_idx])
    for b in range(got.total_bins):  # the same atoms in every bin
        lo, hi = int(got.edges[b]), int(got.edges[b + 1])
        assert ext_set(got, lo, hi) == ext_set(ref, lo, hi)
    from dpsnake.engine.cuda import nbr as nbk

    centers = np.arange(len(coords))
    start, cnt = nbk.bin_ranges(np, centers, got.cbin, got.system, got._geo, got.edges)
    off = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"), -1).reshape(-1, 3)
    nb, boff = ref.nb[system], ref.boff[system]
    b3 = ref.cbin[:, None, :] + off[None]
    inb = ((b3 >= 0) & (b3 < nb[:, None, :])).all(axis=2)
    bid = boff[:, None] + (b3[..., 0] * nb[:, None, 1] + b3[..., 1]) * nb[:, None, 2] + b3[..., 2]
    np.testing.assert_array_equal(cnt, np.where(inb, ref.bcount[np.where(inb, bid, 0)], 0))
    np.testing.assert_array_equal(start[inb], ref.bstart[bid[inb]])
    assert inb.sum() < inb.size and cnt.sum() > 27 * len(coords)  # edges of grids, full bins


def test_bin_order_by_counting_is_a_stable_sort(emulated):
    """The counting sort of the neighbour build's bin keys (count, scan, place with atomics, sort
    each bin's range) gives a stable argsort's order and the bins' edges, empty bins included."""
    from dpsnake.engine.cuda import nbr as nbk

    rng = np.random.default_rng(2)
    for total, E in ((1, 5), (40, 3000), (500, 200)):
        key = rng.integers(0, total, E).astype(np.int64)
        order, edges = nbk.bin_order(np, key, total)
        ref = np.argsort(key, kind="stable")
        np.testing.assert_array_equal(order, ref)
        np.testing.assert_array_equal(edges, np.searchsorted(key[ref], np.arange(total + 1)))
        assert edges[-1] == E
        # on a GPU the atomics place a bin's entries in any order: the per-bin sort restores it
        shuffled = np.concatenate([rng.permutation(ref[edges[b] : edges[b + 1]]) for b in range(total)])
        emulated._k("nb_binsort")(edges[:-1], edges[1:], shuffled)
        np.testing.assert_array_equal(shuffled, ref)


def test_compact_kernel_matches_gathers(emulated):
    """The chunk compaction kernel gives the gathers of the array code (owner, own, d, valid) on a
    batch where compaction drops columns of both type blocks."""
    from dpsnake.engine.cuda import elementwise as ew
    from dpsnake.engine.descriptor import Slots
    from dpsnake.engine.neighbor import NeighborBuilder, chunk_stats

    coords, atype, system, cells, pbc = _batch(2, seed=5)
    sel = [100, 60]
    nb = NeighborBuilder(np, coords, atype, system, cells, pbc, 6.0, sel)
    centers = np.arange(len(coords))[::2]
    ch = nb.chunk(centers)
    stats = chunk_stats(np, ch, sel)
    kept = stats[:-1]
    assert (kept > 0).all() and (kept < sel).all()
    cache = {}
    slots = Slots.cached(sel, kept, np, cache)
    assert Slots.cached(sel, kept, np, cache) is slots
    owner, own, d, valid = ew.compact(np, ch, slots.xcols)
    cols = slots.cols
    np.testing.assert_array_equal(owner, ch.owner[:, cols])
    np.testing.assert_array_equal(valid, ch.valid[:, cols])
    np.testing.assert_array_equal(d, ch.d[:, cols])
    np.testing.assert_array_equal(own, np.where(ch.valid[:, cols], ch.owner[:, cols], centers[:, None]))
    assert (~valid).any() and valid.any()


def test_device_geometry_table_matches_the_host(emulated):
    """The geometry table made from the cells by the nb_geometry kernel equals pack_geometry of
    the host geometry with the same bin grid (cubic, triclinic with two images per direction)."""
    from engine_helpers import triclinic

    from dpsnake.engine import neighbor as N
    from dpsnake.engine.cuda import nbr as nbk

    cells = np.array([fcc(rep=(3, 3, 3)).cell.array, triclinic().cell.array, fcc(rep=(2, 1, 1)).cell.array])
    pbc = np.ones(3, dtype=bool)
    geo = N._CellGeometry(cells, pbc, 4.5)
    nb, bsize = N._bin_grid(geo.lo, geo.hi, 4.5, None)
    boff = np.concatenate([[0], np.cumsum(nb.prod(axis=1))])
    host = nbk.pack_geometry(geo, geo.lo, bsize, nb, boff)
    assert geo.nimg == 2
    got, flag = nbk.device_geometry(np, cells, host, 4.5, geo.nimg)
    np.testing.assert_allclose(got, host, rtol=1e-14, atol=1e-14)
    assert int(flag) == 0
    # cells +3%: same grid; +30%: valid bins, but more would fit, 2% larger than rcut (1);
    # -20%: the first system's 4 bins per direction are below rcut (2); a singular cell (2)
    assert int(nbk.device_geometry(np, cells * 1.03, host, 4.5, geo.nimg)[1]) == 0
    assert int(nbk.device_geometry(np, cells * 1.3, host, 4.5, geo.nimg)[1]) == 1
    assert int(nbk.device_geometry(np, cells * 0.8, host, 4.5, geo.nimg)[1]) == 2
    flat = cells.copy()
    flat[1, 2] = flat[1, 0]
    assert int(nbk.device_geometry(np, flat, host, 4.5, geo.nimg)[1]) == 2


def test_grid_made_on_the_device_follows_npt_cells(cuni, emulated, monkeypatch):
    """As under NPT, the cells change every call: the grid's geometry is remade from the cells on
    the device (no host copy), a grid that no longer fits is remade on the host next call (flag 1)
    or, with bins smaller than rcut, the call redone at once (flag 2); every call equals the host
    path's results, and a singular cell is still one clear error."""
    from dpsnake.engine import ensemble as E
    from dpsnake.engine.cuda import nbr as nbk
    from dpsnake.errors import UserError

    flags, caps = [], []
    real, real_build = nbk.device_geometry, nbk.build_ext

    def spy(*args):
        out = real(*args)
        flags.append(int(out[1]))
        return out

    def spy_build(*args):  # whether the ghosts were counted (None) or given room
        caps.append(args[6] if len(args) == 7 else None)
        return real_build(*args)

    monkeypatch.setattr(nbk, "device_geometry", spy)
    monkeypatch.setattr(nbk, "build_ext", spy_build)
    # a = 4.45: 3 x 3 x 3 cells of 13.35 A, 4 bins of 22.35 / 4 A per direction; +2%: room for 5
    # bins of rcut 4.5 A, but not of 2% more (kept); -10%: the 4 bins still fit, the ghosts (+18%)
    # do not fit the room kept (redone); +5% (from -10%): 5 bins of 4.60 A (flag 1), too small
    # once the cells are back at +0% (flag 2, redone)
    ats = [fcc(a=4.45, rep=(3, 3, 3), seed=s, ni_frac=0.3) for s in (4, 5)]
    tm = ["Cu", "Ni"]
    coords0 = np.concatenate([a.positions for a in ats])
    atype = np.array([tm.index(x) for a in ats for x in a.get_chemical_symbols()])
    system = np.repeat(np.arange(2), 108)
    cells0 = np.array([a.cell.array for a in ats])
    pbc = np.ones(2, dtype=bool)
    ens = E.Ensemble([cuni["dp"]], precision="double", settings={"widths": "guess"})
    layout = ens.layout(atype, system, pbc)
    # (scale, grid flags, calls redone so far); room for the ghosts from the second call on
    steps = [
        (1.0, [], 0),
        (1.0, [0], 0),
        (1.02, [0], 0),
        (0.9, [0], 1),
        (0.9, [0], 1),
        (1.05, [1], 1),
        (1.05, [], 1),
        (1.0, [2], 2),
        (1.0, [0], 2),
    ]
    got = []
    for scale, want, redone in steps:
        flags.clear()
        caps.clear()
        before = ens.grid_misses
        got.append(ens.evaluate(coords0 * scale, atype, system, cells0 * scale, pbc, atomic=True, layout=layout))
        assert (flags, ens.grid_misses) == (want, redone), (scale, flags)
        # a grid made on the device comes with room for the ghosts, not a count; a redo counts them
        assert [c is not None for c in caps] == [bool(want)] + [False] * (redone - before), (scale, caps)
    for (scale, _, _), out in zip(steps, got):  # host grids (made after: they would be reused above)
        ref = E.Ensemble([cuni["dp"]]).evaluate(
            coords0 * scale, atype, system, cells0 * scale, pbc, atomic=True, exact=True
        )
        for k in ("energy", "force", "virial", "atom_energy", "atom_virial"):
            assert rel_err(out[k], ref[k]) < 1e-13, (scale, k)
    flat = cells0.copy()
    flat[0, 2] = flat[0, 0]
    with pytest.raises(UserError, match="system 0 has a singular cell"):
        ens.evaluate(coords0, atype, system, flat, pbc, layout=layout)
    assert flags[-1] == 2
