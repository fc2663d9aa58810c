"""DeePMD-kit's own PyTorch models as the exploration force provider (every energy model it trains).

``DeepmdProvider(paths, xp)`` is called like the built-in engine's provider:
``provider(st, all_models) -> {"energy" (M, S), "force" (M, N, 3), "virial" (M, S, 9)}`` in ``xp``
(eV, eV/A, eV). Model 0 alone on ordinary steps, every model on deviation steps.

How a batch of walkers of different sizes is evaluated: walkers are grouped by (atoms, periodicity
per direction); each group is one call of the model's ``forward(coord (G, n, 3), atype (G, n),
box (G, 9) | None)``, which is what ``deepmd.infer.DeepPot.eval`` calls for G frames of n atoms, so
every walker gets DeePMD-kit's own numbers (the model builds its own neighbour list and ghosts).
DeePMD-kit knows periodic boxes or none; slabs (pbc T, T, F) and wires (F, F, T) get a box whose
periodic rows are the cell's and whose other rows are orthogonal to them and longer than the
atoms' extent along them plus twice the largest rcut (:func:`vacuum_box`, made on the device
every call): no image across that vacuum comes within rcut of an atom, which is exactly the
mixed-periodic system (the cell's own rows along non-periodic directions play no part). Walkers of a group
need not be neighbours in the batch: their atoms are gathered with one index per group, kept on the
device while the batch does not change. On GPUs the state stays in CuPy and crosses to torch
through DLPack (no copies to the host per step).

Two ways to a faster call with the same numbers (rounding aside; both on by default): the images and
the neighbour list are kept between steps (a Verlet list with a skin, :mod:`dpsnake.md.deepmd_lower`,
fed to the model's ``forward_lower``), and DPA-3 models compute without their neighbour padding
(:func:`dynamic_sel_model`). A third, off here by default (``compile=True`` or ``DPSNAKE_DEEPMD_COMPILE=1``;
the workflow's ``explore.compile: auto`` turns it on for GPU jobs): DPA-3's repflow layers through
``torch.compile`` (:func:`compile_repflow_layers`; 2.4x faster calls on an H200, same numbers to FP32
rounding, ~75 s of compilation on the first call, ~31 s loading them from TorchInductor's on-disk cache in a
later process: :func:`use_compile_cache`). A call whose compilation fails reruns with every model as
TorchScript (one RuntimeWarning), and so do all later calls.

Model files: ``.pth`` (``dp --pt freeze``) is loaded with ``torch.jit.load``; ``.dp`` (any backend,
``dp convert-backend``) is turned into the PyTorch model with DeePMD-kit's own deserializer, as
``dp convert-backend model.dp model.pth`` does; a ``.pt`` training checkpoint goes through
``deepmd.pt``'s own loader (``head`` picks the branch of a multitask model).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import warnings

import numpy as np

from dpsnake.errors import UserError
from dpsnake.md.deepmd_lower import VerletGhosts, scatter_to_local


def _torch_device(xp):
    import torch

    if getattr(xp, "__name__", "") == "cupy":
        return torch.device("cuda", xp.cuda.Device().id)
    return torch.device("cpu")


def load_torch_model(path, device, head: str | None = None, dynamic_sel: bool = False, compile: bool = False):
    """One DeePMD-kit PyTorch energy model from ``path`` (.pth, .dp or .pt) on ``device``, in eval mode.

    dynamic_sel: a DPA-3 model (.pth or .dp) comes back computing through its repflow's dynamic
    neighbour selection (:func:`dynamic_sel_model`), the same function without the padding.
    compile (with dynamic_sel): that DPA-3 model eager, its repflow layers compiled
    (:func:`compile_repflow_layers`); other models come back as without it.
    Raises UserError (one line) for a missing file, a file DeePMD-kit cannot read, or a model that is
    not an energy model (dipole, polarizability, DOS, spin)."""
    import deepmd.pt.cxx_op  # noqa: F401  DeePMD-kit's custom ops, which frozen models may call

    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"{path}: model file not found")
    try:
        model = None
        if dynamic_sel and p.suffix in (".pth", ".dp"):
            model = dynamic_sel_model(p, device, script=not compile)
            if model is not None and compile:
                model.dpsnake_compiled_layers = compile_repflow_layers(model)
        if model is None:
            model = _load(p, device, head)
    except UserError:
        raise
    except Exception as err:  # torch / deepmd raise many kinds: say which file
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        raise UserError(f"{path}: DeePMD-kit cannot load it ({type(err).__name__}: {first})") from None
    model = model.to(device)
    model.eval()
    out_types = model.model_output_type() if hasattr(model, "model_output_type") else ["energy"]
    if "energy" not in out_types:
        raise UserError(f"{path}: a {'/'.join(out_types)} model: exploration needs an energy model")
    spin = getattr(model, "has_spin", False)
    if spin() if callable(spin) else spin:
        raise UserError(f"{path}: spin models are unsupported in exploration")
    return model


def _load(p: pathlib.Path, device, head):
    """The model of a .pth, .dp or .pt file as DeePMD-kit loads it."""
    import torch

    if p.suffix == ".pth":
        return torch.jit.load(str(p), map_location=device)
    if p.suffix == ".dp":
        return _from_dp(p, device)
    if p.suffix == ".pt":
        from deepmd.infer.deep_pot import DeepPot  # DeePMD-kit's own checkpoint loader (and head)

        return DeepPot(str(p), head=head, auto_batch_size=False).deep_eval.dp.model["Default"]
    raise UserError(f"{p}: unknown model file suffix {p.suffix!r} (.pth, .dp or .pt)")


def _from_dp(path: pathlib.Path, device):
    """A .dp file as a TorchScript PyTorch model, through DeePMD-kit's own .dp -> .pth conversion."""
    import torch
    from deepmd.dpmodel.utils.serialization import load_dp_model
    from deepmd.pt.utils.serialization import deserialize_to_file

    data = load_dp_model(str(path))
    with tempfile.TemporaryDirectory(prefix="dpsnake-pth-") as tmp:
        pth = os.path.join(tmp, "model.pth")
        deserialize_to_file(pth, data)
        return torch.jit.load(pth, map_location=device)


def dynamic_sel_model(path: pathlib.Path, device, script: bool = True):
    """DeePMD-kit's TorchScript model of a DPA-3 ``.pth`` / ``.dp`` whose repflow selects neighbours
    dynamically (``use_dynamic_sel`` True, ``sel_reduce_factor`` 1), or None for other models.

    Why: DPA-3 pads every atom's edges to e_sel (120 in DeePMD-kit's example) and its angles to
    a_sel^2 (900) and computes on the padding; fcc Cu has ~80 and ~18^2 real ones. DeePMD-kit's
    dynamic path computes on the real edges and angles only, and with sel_reduce_factor 1 its
    normalisations (sums / e_sel, / sqrt(e_sel), / sqrt(a_sel)) are the static path's: the same
    function (the padding contributes exact zeros through the switch functions), the same weights
    (state_dict unchanged), rounding aside (FP64: 2e-15 relative, tests/test_md_deepmd.py). The model is
    rebuilt from DeePMD-kit's own serialisation (deepmd.pt's serialize_from_file / the .dp dict) and
    scripted as ``dp convert-backend`` does. It needs smooth_edge_update (DeePMD-kit refuses the
    dynamic path without it). script False: the eager model (what :func:`compile_repflow_layers` takes)."""
    import torch
    from deepmd.pt.model.model import BaseModel

    if path.suffix == ".pth":
        from deepmd.pt.utils.serialization import serialize_from_file

        data = serialize_from_file(str(path))
    else:
        from deepmd.dpmodel.utils.serialization import load_dp_model

        data = load_dp_model(str(path))
    m = data["model"]
    args = m.get("descriptor", {}).get("repflow_args") if m.get("type") == "standard" else None
    if not args or m["descriptor"].get("type") != "dpa3" or args.get("use_dynamic_sel", True):
        return None  # not DPA-3, or dynamic already
    if not args.get("smooth_edge_update", False):
        return None
    # the block's arguments and each layer's own copy of them (the layers are deserialised from theirs)
    layers = m["descriptor"].get("repflow_variable", {}).get("repflow_layers", [])
    for d in [args, *layers]:
        d.update(use_dynamic_sel=True, sel_reduce_factor=1.0)
    model = BaseModel.deserialize(m)
    model.model_def_script = json.dumps(data.get("model_def_script", {}))  # as deserialize_to_file sets it
    model.eval()  # training mode would keep the forces' graph (DeePMD-kit's create_graph=self.training)
    return (torch.jit.script(model) if script else model).to(device).eval()


def use_compile_cache(path) -> str:
    """Point TorchInductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``; Triton's kernels go below it
    unless ``TRITON_CACHE_DIR`` is set) at the folder ``path`` for this process, before anything compiles;
    returns it (absolute). A later process with the same folder, on any node that sees it, loads the
    compiled repflow layers instead of compiling them: on the H200 a DPA-3 explore job's first call took
    74.6 s compiling, 31.2 s from the cache (TorchScript's first two calls: 29.8 s; docs/benchmarks.md)."""
    folder = pathlib.Path(path).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return str(folder)


def compile_cache_counts() -> dict:
    """This process's compiled graphs by where they came from: {"loaded": from TorchInductor's on-disk
    cache, "compiled": compiled here (and stored there), "uncacheable": compiled, not storable}."""
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    return {
        k: int(c[f"fxgraph_cache_{v}"]) for k, v in (("loaded", "hit"), ("compiled", "miss"), ("uncacheable", "bypass"))
    }


def compile_repflow_layers(model) -> int:
    """``torch.compile`` (TorchInductor, dynamic shapes) of each repflow layer's forward of an eager
    DPA-3 model (:func:`dynamic_sel_model` with script False); returns the number of layers compiled.

    Why: DeePMD-kit's repflow layer is a chain of small gathers, elementwise products and index_add_
    sums over the edges and angles (the torch profiler: gather, index_add_, mul ~64% of the CUDA time),
    each a kernel of its own that reads and writes its whole operand; Inductor fuses them, forward and
    backward (the forces). H200, 64 walkers x 108 atoms of fcc Cu, DeePMD-kit's example DPA-3 in FP32
    (bench/profiling/profile_deepmd_provider.py, stage dyn): 0.263 s per call TorchScript, 0.108 s
    compiled, max |dF| 1.5e-8 eV/A (the eager model's own difference to TorchScript), peak memory 4.8
    instead of 8.3 MB per atom of a call. The first call compiles (92 s there; 22-160 s for the tests'
    small model on the shared 2-core CPU); edge and angle counts and the batch size are dynamic sizes and
    every layer of every model shares the graph, so later calls do not recompile.
    The descriptor's graph-index step (``.item()``, boolean masks) stays eager. DeePMD-kit's force
    derivative keeps its graph (``retain_graph=True``), which Inductor's donated buffers refuse: they
    are turned off for the process (``torch._functorch.config.donated_buffer``). On a CPU the layers compile
    to scalar C++ (``torch._inductor.config.cpp.simdlen = 1``, for the process): Inductor's vectorised
    C++ of the backward crashed the process (SIGSEGV) on the 2-core AMD EPYC dev machine with AVX2 and
    AVX-512 code alike (torch 2.11), and passed scalar."""
    import torch
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config
    import torch.fx.experimental._config

    torch._functorch.config.donated_buffer = False
    if next(model.parameters()).device.type == "cpu":
        torch._inductor.config.cpp.simdlen = 1
    # no "duck" sizes: a batch of 2 frames would otherwise share its symbol with edge_index's leading 2
    # and the next batch size recompile (CPU: unique graphs 2 -> 1 over 2, 3, 5 frames)
    torch.fx.experimental._config.use_duck_shape = False
    cfg = torch._dynamo.config  # one entry per layer of every model: keep them all compiled
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    n = 0
    for layer in model.atomic_model.descriptor.repflows.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
        n += 1
    return n


def vacuum_box(torch, coord, heff, pbc: tuple, rcut: float):
    """(G, 9) boxes for DeePMD-kit of G frames of a slab or wire: the periodic rows of ``heff``
    (G, 3, 3) (:func:`~dpsnake.engine.neighbor.effective_cells`: non-periodic rows are unit vectors
    orthogonal to the periodic ones), each non-periodic row scaled to the atoms' extent along it
    plus 2 ``rcut`` (A). coord (G, n, 3) A; pbc (3,) bools. An image across the vacuum is then at
    least 2 rcut from every atom, so DeePMD-kit's periodic neighbour list finds exactly the pairs of
    the mixed-periodic system (its wrapping moves atoms by lattice vectors only: same distances)."""
    rows = []
    for k in range(3):
        h = heff[:, k]  # (G, 3)
        if not pbc[k]:
            proj = (coord * h[:, None, :]).sum(dim=2)  # (G, n), A along the unit row
            length = proj.amax(dim=1) - proj.amin(dim=1) + 2.0 * rcut
            h = h * length[:, None]
        rows.append(h)
    return torch.stack(rows, dim=1).reshape(-1, 9)


class _Group:
    """Walkers of one size and periodicity: gather indices on the device.

    atoms (G * n,) long: batch atom indices, walker by walker; sys (G,) long: their system
    indices; pbc (3,) bools, the periodic directions."""

    def __init__(
        self, torch, device, natoms: int, pbc: tuple, sys_idx: np.ndarray, bounds: np.ndarray, atype_host: np.ndarray
    ):
        self.n, self.pbc, self.G = natoms, tuple(bool(p) for p in pbc), len(sys_idx)
        atoms = np.concatenate([np.arange(bounds[s], bounds[s] + natoms) for s in sys_idx])
        self.atoms = torch.as_tensor(atoms, dtype=torch.long, device=device)
        self.sys = torch.as_tensor(sys_idx, dtype=torch.long, device=device)
        self.atype = torch.as_tensor(atype_host[atoms].reshape(self.G, natoms), dtype=torch.long, device=device)
        self.ghosts = None  # VerletGhosts of the group, made on its first call


class DeepmdProvider:
    """Force provider on DeePMD-kit's PyTorch models (see the module docstring).

    paths: model files, the first drives MD; xp: numpy (models on the CPU) or cupy (on the current
    GPU); head: branch of multitask ``.pt`` checkpoints; max_atoms: atoms per model call at most
    ("auto": on GPUs, what fits in ``MEMORY_SHARE`` of the device's memory, measured on the first
    call; on CPUs no bound; None: no bound). A call that runs out of device memory anyway is retried
    with half as many frames, and the bound kept. skin (A): images and neighbour list kept while no
    atom moved more than allowed (deepmd_lower; None: DeePMD-kit's forward, its own list every call).
    dynamic_sel: DPA-3 models run without their padding (:func:`dynamic_sel_model`). compile: with
    dynamic_sel, DPA-3 models run eager with torch.compile'd repflow layers (:func:`compile_repflow_layers`;
    None: the environment's ``DPSNAKE_DEEPMD_COMPILE``, "1" on); ``compiled``: the models that are.
    """

    SKIN = 1.0  # A, of the kept neighbour list (deepmd_lower; LAMMPS' `neighbor 1.0 bin` in the benchmarks)
    MEMORY_SHARE = 0.4  # of the GPU's memory for one model call (DeePMD-kit keeps every intermediate
    # for the force backward pass: ~5 MB per atom for se_atten_v2 of the docs' size in FP64)

    def __init__(
        self,
        paths,
        xp=np,
        head: str | None = None,
        max_atoms: int | str | None = "auto",
        skin: float | None = 1.0,
        dynamic_sel: bool = True,
        compile: bool | None = None,
    ):
        from dpsnake.md.engines import deepmd_missing

        missing = deepmd_missing()
        if missing:
            raise UserError(f"engine deepmd: {missing}")
        import torch

        self.torch = torch
        self.xp = xp
        self.device = _torch_device(xp)
        self.paths = [str(p) for p in paths]
        if compile is None:
            compile = os.environ.get("DPSNAKE_DEEPMD_COMPILE", "0").strip() not in ("", "0")
        self.head, self.dynamic_sel = head, dynamic_sel
        self.models = [load_torch_model(p, self.device, head, dynamic_sel, compile) for p in self.paths]
        self.compiled = sum(getattr(m, "dpsnake_compiled_layers", 0) > 0 for m in self.models)
        maps = [list(m.get_type_map()) for m in self.models]
        for p, tm in zip(self.paths[1:], maps[1:]):
            if tm != maps[0]:
                raise UserError(
                    f"{p}: type_map {tm} differs from {self.paths[0]}'s {maps[0]} (an ensemble shares one type_map)"
                )
        self.type_map = maps[0]
        self.nmodels = len(self.models)
        # the vacuum of slabs' and wires' boxes (vacuum_box): 2 x the largest cutoff of any model
        self.rcut = max(float(m.get_rcut()) for m in self.models)
        self.max_atoms = None if max_atoms == "auto" and self.device.type != "cuda" else max_atoms
        # skin None, or a model without forward_lower: DeePMD-kit's forward (its own list every call)
        lower = all(hasattr(m, "forward_lower") for m in self.models)
        self.skin = float(skin) if skin is not None and lower else None
        self.calls = 0
        self.overflow_calls = 0  # the models keep the sel nearest neighbours themselves (no count)
        self.last_overflow = 0
        self._key = None
        self._groups = None
        self._pbc3 = None

    # ------------------------------------------------------------------ batch layout
    def _layout(self, st) -> list[_Group]:
        """Groups of the batch, remade only when the state's fixed arrays change (walkers dropped)."""
        key = (id(st.atype), id(st.system), id(st.pbc), st.atype.shape[0])
        if self._key != key:
            from dpsnake.engine.neighbor import pbc_axes
            from dpsnake.engine.xp import to_numpy

            natoms = to_numpy(st.natoms).astype(np.int64)
            pbc = pbc_axes(st.pbc, natoms.shape[0])  # (S, 3)
            atype = to_numpy(st.atype).astype(np.int64)
            bounds = np.concatenate([[0], np.cumsum(natoms)])
            groups = []
            for n, *p in sorted({(int(n), *map(bool, p)) for n, p in zip(natoms, pbc)}):
                sys_idx = np.nonzero((natoms == n) & (pbc == p).all(axis=1))[0]
                groups.append(_Group(self.torch, self.device, n, tuple(p), sys_idx, bounds, atype))
            self._key, self._groups = key, groups
            # (S, 3) on the device for effective_cells, if some walker is a slab or a wire
            self._pbc3 = self.xp.asarray(pbc) if any(0 < sum(g.pbc) < 3 for g in groups) else None
            self._held = (st.atype, st.system, st.pbc)  # keep ids unique while the key is used
        return self._groups

    # ------------------------------------------------------------------ conversions
    def _to_torch(self, a):
        torch = self.torch
        if self.xp is np:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
        return torch.from_dlpack(self.xp.ascontiguousarray(a, dtype=self.xp.float64))

    def _to_xp(self, t):
        if self.xp is np:
            return t.numpy()
        return self.xp.from_dlpack(t.contiguous())

    # ------------------------------------------------------------------ evaluation
    def _measure(self, call, G: int, n: int) -> None:
        """max_atoms "auto" on a GPU: the memory one more atom costs in a call (the slope between calls
        on 2 and 8 frames, after a warm-up call: TorchScript's first calls and cuBLAS workspaces add a
        fixed amount that a single small call would count per atom), against MEMORY_SHARE of the device.
        call(lo, hi): the model on frames lo:hi."""
        cuda = self.torch.cuda

        def peak(k):
            cuda.synchronize()
            base = cuda.memory_allocated()
            cuda.reset_peak_memory_stats()
            out = call(0, k)
            del out
            return cuda.max_memory_allocated() - base

        k1, k2 = min(2, G), min(8, G)
        peak(k1)  # warm-up
        p1, p2 = peak(k1), peak(k2)
        per_atom = (p2 - p1) / ((k2 - k1) * n) if k2 > k1 and p2 > p1 else p2 / (k2 * n)
        total = cuda.get_device_properties(self.device).total_memory
        self.max_atoms = max(n, int(self.MEMORY_SHARE * total / max(1.0, per_atom)))

    @staticmethod
    def _is_oom(err) -> bool:
        # TorchScript models raise RuntimeError("CUDA out of memory ..."), eager ones OutOfMemoryError
        return "out of memory" in str(err).lower()

    def _forward(self, call, G: int, n: int) -> dict:
        """``call(lo, hi)`` (the model on frames lo:hi of a group of G frames of n atoms, outputs
        detached) on all G frames: energy (G,), force (G, n, 3), virial (G, 9), in calls of at most
        max_atoms atoms."""
        if self.max_atoms == "auto":
            self._measure(call, G, n)
        step = G if self.max_atoms is None else max(1, min(G, self.max_atoms // n))
        while True:
            try:
                parts = [call(i, min(G, i + step)) for i in range(0, G, step)]
                break
            except (self.torch.OutOfMemoryError, RuntimeError) as err:
                if step == 1 or not self._is_oom(err):
                    raise
                step = max(1, step // 2)  # this many frames do not fit: fewer per call from now on
                self.max_atoms = step * n
                self.torch.cuda.empty_cache()
        cat = self.torch.cat
        return {
            "energy": cat([p["energy"].reshape(-1) for p in parts]),
            "force": cat([p["force"].reshape(-1, n, 3) for p in parts]),
            "virial": cat([p["virial"].reshape(-1, 9) for p in parts]),
        }

    @staticmethod
    def _upper(model, coord, atype, box):
        """DeePMD-kit's ``forward``: it builds its own images and neighbour list; call(lo, hi)."""

        def call(lo, hi):
            out = model(coord[lo:hi], atype[lo:hi], box=None if box is None else box[lo:hi], do_atomic_virial=False)
            # detach at once: the energy's autograd graph holds every intermediate of the call, and
            # keeping it until all calls are done would add up the memory the split is there to bound
            return {k: out[k].detach() for k in ("energy", "force", "virial")}

        return call

    def _lower(self, model, ext, ext_atype, nlist, mapping, n: int):
        """DeePMD-kit's ``forward_lower`` on the kept images and list (deepmd_lower); call(lo, hi)."""
        torch = self.torch

        def call(lo, hi):
            out = model.forward_lower(
                ext[lo:hi], ext_atype[lo:hi], nlist[lo:hi], mapping[lo:hi], do_atomic_virial=False
            )
            force = scatter_to_local(torch, out["extended_force"].detach(), mapping[lo:hi], n)
            # the virial of forward_lower already sums -r (x) f over the images (DeePMD-kit's own)
            return {"energy": out["energy"].detach(), "force": force, "virial": out["virial"].detach()}

        return call

    def __call__(self, st, all_models: bool) -> dict:
        self.calls += 1
        try:
            return self._call(st, all_models)
        except Exception as err:  # torch.compile fails in many ways (Dynamo, Inductor, Triton, C++)
            if not self.compiled or self._is_oom(err):
                raise
            self._uncompile(err)
            return self._call(st, all_models)

    def _uncompile(self, err) -> None:
        """A compiled model failed (its compilation: TorchInductor, Triton, the C++ compiler): every model
        back to TorchScript, with one warning line; the exploration goes on at TorchScript's speed."""
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        warnings.warn(
            f"torch.compile of the DPA-3 layers failed ({type(err).__name__}: {first[:300]}); "
            "the models run as TorchScript",
            RuntimeWarning,
            stacklevel=3,
        )
        self.models = [load_torch_model(p, self.device, self.head, self.dynamic_sel, False) for p in self.paths]
        self.compiled = 0

    def _call(self, st, all_models: bool) -> dict:
        torch = self.torch
        groups = self._layout(st)
        models = self.models if all_models else self.models[:1]
        M, N, S = len(models), int(st.pos.shape[0]), int(st.cells.shape[0])
        pos, cells = self._to_torch(st.pos), self._to_torch(st.cells).reshape(S, 9)
        heff = None
        if self._pbc3 is not None:  # slabs, wires: their cells' unit rows across the periodic ones
            from dpsnake.engine.neighbor import effective_cells

            cells3 = self.xp.asarray(st.cells, dtype=self.xp.float64).reshape(S, 3, 3)
            heff = self._to_torch(effective_cells(self.xp, cells3, self._pbc3))
        kw = {"dtype": torch.float64, "device": self.device}
        energy, force, virial = torch.zeros((M, S), **kw), torch.zeros((M, N, 3), **kw), torch.zeros((M, S, 9), **kw)
        for g in groups:
            coord = pos.index_select(0, g.atoms).reshape(g.G, g.n, 3)
            if self.skin is not None:  # kept images + Verlet list, DeePMD-kit's forward_lower
                if all(g.pbc):
                    h = cells.index_select(0, g.sys).reshape(g.G, 3, 3)
                else:
                    h = heff.index_select(0, g.sys) if any(g.pbc) else None
                if g.ghosts is None:
                    g.ghosts = VerletGhosts(torch, self.rcut, self.skin, g.pbc)
                ext, mapping, nlist = g.ghosts.update(coord, h)
                ext_atype = torch.gather(g.atype, 1, mapping)
                calls = [self._lower(m, ext, ext_atype, nlist, mapping, g.n) for m in models]
            else:  # DeePMD-kit's forward: its own images and neighbour list on every call
                if all(g.pbc):
                    box = cells.index_select(0, g.sys)
                elif any(g.pbc):
                    box = vacuum_box(torch, coord, heff.index_select(0, g.sys), g.pbc, self.rcut)
                else:
                    box = None
                calls = [self._upper(m, coord, g.atype, box) for m in models]
            for m, call in enumerate(calls):
                out = self._forward(call, g.G, g.n)
                energy[m].index_copy_(0, g.sys, out["energy"].to(torch.float64))
                force[m].index_copy_(0, g.atoms, out["force"].reshape(-1, 3).to(torch.float64))
                virial[m].index_copy_(0, g.sys, out["virial"].to(torch.float64))
        return {"energy": self._to_xp(energy), "force": self._to_xp(force), "virial": self._to_xp(virial)}

    def evaluate(self, coords, atype, system, cells, pbc) -> dict:
        """Every model on a flat batch, as ``Ensemble.evaluate`` takes it (coords (N, 3), atype (N,),
        system (N,) sorted, cells (S, 3, 3), pbc (S, 3) or (S,)): energy (M, S), force (M, N, 3), virial (M, S, 9)."""
        import types

        xp = self.xp
        natoms = xp.bincount(xp.asarray(system), minlength=int(cells.shape[0]))
        st = types.SimpleNamespace(pos=coords, atype=atype, system=system, cells=cells, pbc=pbc, natoms=natoms)
        return self(st, True)
