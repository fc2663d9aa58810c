"""Where a DeepmdProvider call on DeePMD-kit's models spends its time (issue 17, DPA-3), GPU.

One batch of W walkers x 108 atoms of fcc Cu (rattled, cells scaled +-1 %), model 0 only (an
ordinary MD step). Stages, each written to the JSON as soon as it is done:
  provider    DeepmdProvider(skin=None, dynamic_sel=False) (DeePMD-kit's forward: its own images + list
              every call) vs skin 1 (kept images + Verlet list, forward_lower) vs skin 1 + dynamic_sel
              (DPA-3 without padding): s per call, max force difference, peak memory per atom, chunk
  parts       DeePMD-kit's eager model (get_model + the .pth's state_dict) on --frames walkers: images +
              neighbour list (extend_input_and_build_neighbor_list), format_nlist, descriptor
              forward, fitting forward, backward (forces), each CUDA-synchronised; TorchScript vs eager
              forward_lower; a torch.profiler table of one eager forward_lower
  chunks      forward_lower (TorchScript) per atom at several frames per call
  compile     torch.compile of the eager atomic model's forward_atomic: first-call (compile) time,
              s per call, max |dF| against eager
  dyn         the dynamic-selection DPA-3 model (what DeepmdProvider runs) on --dyn-frames walkers:
              TorchScript (the provider's) vs eager vs eager with torch.compile of each repflow layer
              (dynamic shapes) vs of the whole descriptor block; TF32 on (TorchScript); s per call, first
              call, a call after the atoms moved (other edge counts), max |dF| vs TorchScript; then
              TorchScript at --dyn-chunks frames per call
Run on the GPU machine with DeePMD-kit importable:
  python3 bench/profiling/profile_deepmd_provider.py M0.pth [M1.pth ...] --walkers 256 --json $OUT/profile.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src"))

A_CU = 3.634


def fcc_batch(walkers: int, rep: int = 3, seed: int = 0):
    """Positions (W * n, 3), cells (W, 3, 3) of W rattled fcc Cu cells of 4 rep^3 atoms."""
    rng = np.random.default_rng(seed)
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    grid = np.array([[i, j, k] for i in range(rep) for j in range(rep) for k in range(rep)])
    frac = (grid[:, None, :] + base[None]).reshape(-1, 3) / rep
    pos, cells = [], []
    for _ in range(walkers):
        a = A_CU * rep * rng.uniform(0.99, 1.01)
        cells.append(np.eye(3) * a)
        pos.append(frac * a + rng.normal(0.0, 0.05, frac.shape))
    return np.concatenate(pos), np.array(cells)


def timed(torch, fn, reps=3, warm=2):
    """(median s, last result) of fn() after warm calls, CUDA-synchronised."""
    for _ in range(warm):
        fn()
    ts, out = [], None
    for _ in range(reps):
        out = None  # free the previous call's outputs (and their autograd graph) before the next call
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), out


def peak_per_atom(torch, fn, atoms):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / atoms


def eager_model(path, device):
    """DeePMD-kit's eager PyTorch model of a frozen .pth (as its serialize_from_file makes it)."""
    import torch
    from deepmd.pt.model.model import get_model

    saved = torch.jit.load(str(path), map_location="cpu")
    model = get_model(json.loads(saved.model_def_script))
    model.load_state_dict(saved.state_dict())
    return model.to(device).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--walkers", type=int, default=256)
    ap.add_argument("--json", default="profile_deepmd_provider.json")
    ap.add_argument("--stages", default="provider,parts,chunks,compile", help="comma- or dash-separated")
    ap.add_argument("--chunks", default="32,64,128,256")
    ap.add_argument("--frames", type=int, default=8, help="walkers of the parts and compile stages")
    ap.add_argument("--dyn-frames", type=int, default=64, help="walkers of the dyn stage")
    ap.add_argument("--dyn-chunks", default="32,96,128")
    args = ap.parse_args()
    import cupy as cp
    import deepmd.pt.cxx_op  # noqa: F401
    import torch

    from dpsnake.md.deepmd_lower import VerletGhosts, scatter_to_local
    from dpsnake.md.deepmd_provider import DeepmdProvider, dynamic_sel_model

    res = {"walkers": args.walkers, "models": args.models, "device": torch.cuda.get_device_name()}
    out = pathlib.Path(args.json)

    def save():
        out.write_text(json.dumps(res, indent=1) + "\n")

    pos, cells = fcc_batch(args.walkers)
    W, n = cells.shape[0], pos.shape[0] // cells.shape[0]
    N = W * n
    import types

    st = types.SimpleNamespace(
        pos=cp.asarray(pos),
        atype=cp.zeros(N, dtype=cp.int64),
        system=cp.repeat(cp.arange(W), n),
        natoms=cp.full(W, n),
        pbc=cp.ones(W, dtype=bool),
        cells=cp.asarray(cells),
    )
    stages = args.stages.replace("-", ",").split(",")
    if "provider" in stages:
        r = {}
        forces = {}
        for name, skin, dyn in (("forward", None, False), ("lower", 1.0, False), ("lower_dynamic_sel", 1.0, True)):
            prov = DeepmdProvider(args.models[:1], cp, skin=skin, dynamic_sel=dyn)
            t, o = timed(torch, lambda: prov(st, False))
            mem = peak_per_atom(torch, lambda: prov(st, False), N)
            forces[name] = cp.asnumpy(o["force"][0])
            r[name] = {
                "s_per_call": t,
                "us_per_atom": 1e6 * t / N,
                "peak_bytes_per_atom": mem,
                "max_atoms": prov.max_atoms,
            }
            print(name, r[name], flush=True)
            del prov
            torch.cuda.empty_cache()
        r["max_abs_dF_lower_vs_forward"] = float(np.abs(forces["lower"] - forces["forward"]).max())
        r["max_abs_dF_dynamic_vs_forward"] = float(np.abs(forces["lower_dynamic_sel"] - forces["forward"]).max())
        r["max_abs_F"] = float(np.abs(forces["forward"]).max())
        res["provider"] = r
        save()
        print(r, flush=True)

    dev = torch.device("cuda")
    script = torch.jit.load(args.models[0], map_location=dev).eval()
    model = eager_model(args.models[0], dev)
    # parts and compile on one chunk of --frames walkers: the static eager model keeps ~14 MB per atom
    # of a call for its backward pass (run9: 237 frames ran out of the H200's memory; session 17: 32 frames
    # too while timed() kept the previous call's graph alive: it now drops it first, and 8 frames is the default)
    G = min(W, args.frames)
    coord = torch.as_tensor(pos[: G * n].reshape(G, n, 3), device=dev)
    box = torch.as_tensor(cells[:G].reshape(G, 9), device=dev)
    atype = torch.zeros((G, n), dtype=torch.long, device=dev)
    gh = VerletGhosts(torch, float(model.get_rcut()), 1.0, (True, True, True))
    ext, mapping, nlist = gh.update(coord, box.reshape(G, 3, 3))
    ext_atype = torch.gather(atype, 1, mapping)
    res["chunk_frames"] = G
    res["nlist_width_skin1"] = int(nlist.shape[2])
    if "parts" in stages:
        from deepmd.pt.utils.nlist import extend_input_and_build_neighbor_list

        r = {"frames": G}
        rc, sel = float(model.get_rcut()), model.get_sel()
        # float64 in, as the model's forward passes them (DeePMD-kit's global precision; its shifts are float64)
        r["deepmd_images_nlist_s"], (e_c, e_t, e_map, e_nl) = timed(
            torch, lambda: extend_input_and_build_neighbor_list(coord, atype, rc, sel, mixed_types=True, box=box)
        )
        r["verlet_build_s"] = timed(torch, lambda: gh._build(coord, box.reshape(G, 3, 3)))[0]
        r["verlet_reuse_s"] = timed(torch, lambda: gh.update(coord, box.reshape(G, 3, 3)))[0]
        r["format_nlist_s"], nl = timed(
            torch, lambda: model.format_nlist(e_c, e_t, e_nl, extra_nlist_sort=model.need_sorted_nlist_for_lower())
        )
        am = model.atomic_model
        xg = e_c.detach().clone().requires_grad_(True)

        def desc():
            return am.descriptor(xg, e_t, nl, mapping=e_map)

        r["descriptor_forward_s"] = timed(torch, desc)[0]
        r["atomic_forward_s"] = timed(torch, lambda: am.forward_atomic(xg, e_t, nl, mapping=e_map))[0]

        def fwd_bwd():
            ret = am.forward_atomic(xg, e_t, nl, mapping=e_map)
            return torch.autograd.grad(ret["energy"].sum(), xg)[0]

        r["atomic_forward_backward_s"] = timed(torch, fwd_bwd)[0]
        r["eager_forward_s"] = timed(torch, lambda: model(coord, atype, box=box))[0]
        r["script_forward_s"] = timed(torch, lambda: script(coord, atype, box=box))[0]
        r["eager_forward_lower_s"] = timed(torch, lambda: model.forward_lower(ext, ext_atype, nlist, mapping))[0]
        r["script_forward_lower_s"], o = timed(torch, lambda: script.forward_lower(ext, ext_atype, nlist, mapping))
        dyn = dynamic_sel_model(pathlib.Path(args.models[0]), dev)
        if dyn is not None:
            r["script_dynamic_sel_forward_lower_s"], _ = timed(
                torch, lambda: dyn.forward_lower(ext, ext_atype, nlist, mapping)
            )
            r["peak_bytes_per_atom_script_dynamic_sel_lower"] = peak_per_atom(
                torch, lambda: dyn.forward_lower(ext, ext_atype, nlist, mapping), G * n
            )
            del dyn
        r["scatter_s"] = timed(torch, lambda: scatter_to_local(torch, o["extended_force"], mapping, n))[0]
        r["peak_bytes_per_atom_script_forward"] = peak_per_atom(torch, lambda: script(coord, atype, box=box), G * n)
        r["peak_bytes_per_atom_script_lower"] = peak_per_atom(
            torch, lambda: script.forward_lower(ext, ext_atype, nlist, mapping), G * n
        )
        print(r, flush=True)
        res["parts"] = r
        save()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.forward_lower(ext, ext_atype, nlist, mapping)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
        print(table, flush=True)
        res["profile_eager_forward_lower"] = table
        save()
        del o
        torch.cuda.empty_cache()

    if "chunks" in stages:
        allc = torch.as_tensor(pos.reshape(W, n, 3), device=dev)
        allb = torch.as_tensor(cells, device=dev)
        ga = VerletGhosts(torch, float(model.get_rcut()), 1.0, (True, True, True))
        x_all, m_all, nl_all = ga.update(allc, allb)
        t_all = torch.zeros_like(m_all)
        r = {}
        for k in [int(c) for c in args.chunks.split(",") if int(c) <= W]:
            try:
                t, _ = timed(
                    torch, lambda: script.forward_lower(x_all[:k], t_all[:k], nl_all[:k], m_all[:k]), reps=2, warm=1
                )
                mem = peak_per_atom(
                    torch, lambda: script.forward_lower(x_all[:k], t_all[:k], nl_all[:k], m_all[:k]), k * n
                )
                r[k] = {"us_per_atom": 1e6 * t / (k * n), "peak_bytes_per_atom": mem}
            except Exception as err:  # out of memory at the largest
                r[k] = {"error": f"{type(err).__name__}: {str(err)[:100]}"}
            torch.cuda.empty_cache()
            print("chunk", k, r[k], flush=True)
        res["chunks_script_lower"] = r
        save()

    if "compile" in stages:
        r = {}
        am = model.atomic_model
        eager_fa = am.forward_atomic
        ref = model.forward_lower(ext, ext_atype, nlist, mapping)["extended_force"].detach()
        am.forward_atomic = torch.compile(eager_fa, dynamic=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            o = model.forward_lower(ext, ext_atype, nlist, mapping)
            torch.cuda.synchronize()
            r["first_call_s"] = time.perf_counter() - t0
            r["max_abs_dF_vs_eager"] = float((o["extended_force"].detach() - ref).abs().max())
            r["s_per_call"] = timed(torch, lambda: model.forward_lower(ext, ext_atype, nlist, mapping))[0]
            r["peak_bytes_per_atom"] = peak_per_atom(
                torch, lambda: model.forward_lower(ext, ext_atype, nlist, mapping), G * n
            )
        except Exception as err:
            r["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print("compile", r, flush=True)
        res["compile"] = r
        save()

    if "dyn" in stages:
        dyn_stage(torch, args, res, save, pos, cells, W, n, dev)
    return 0


def dyn_stage(torch, args, res, save, pos, cells, W, n, dev):
    """The dyn stage (see the module docstring), results under res["dyn"]."""
    from dpsnake.md.deepmd_lower import VerletGhosts
    from dpsnake.md.deepmd_provider import compile_repflow_layers, dynamic_sel_model

    path = pathlib.Path(args.models[0])
    script = dynamic_sel_model(path, dev)
    if script is None:
        res["dyn"] = {"error": "not a DPA-3 model"}
        save()
        return
    G = min(W, args.dyn_frames)
    r = {"frames": G}
    res["dyn"] = r

    def inputs(shift):
        rng = np.random.default_rng(1)
        c = pos[: G * n].reshape(G, n, 3) + shift * rng.normal(0.0, 1.0, (G, n, 3))
        coord = torch.as_tensor(c, device=dev)
        box = torch.as_tensor(cells[:G], device=dev)
        gh = VerletGhosts(torch, float(script.get_rcut()), 1.0, (True, True, True))
        ext, mapping, nlist = gh.update(coord, box)
        return ext, torch.zeros_like(mapping), nlist, mapping

    a, b = inputs(0.0), inputs(0.03)  # b: the atoms moved, other edge and angle counts

    def force(m, x):
        return m.forward_lower(*x, do_atomic_virial=False)["extended_force"].detach()

    ref_a, ref_b = force(script, a), force(script, b)
    r["max_abs_F"] = float(ref_a.abs().max())
    r["script_s"] = timed(torch, lambda: force(script, a))[0]
    print("dyn script", r["script_s"], flush=True)
    save()

    def variant(name, model):
        v = {}
        r[name] = v
        try:
            for pre, x, ref in (("", a, ref_a), ("moved_", b, ref_b)):  # first call: compiles where compiled
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                f = force(model, x)
                torch.cuda.synchronize()
                v[pre + "first_call_s"] = time.perf_counter() - t0
                v[pre + "max_abs_dF"] = float((f - ref).abs().max())
                v[pre + "s_per_call"] = timed(torch, lambda: force(model, x))[0]
            v["peak_bytes_per_atom"] = peak_per_atom(torch, lambda: force(model, a), G * n)
        except Exception as err:
            v["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print("dyn", name, v, flush=True)
        save()
        torch.cuda.empty_cache()

    allc = torch.as_tensor(pos.reshape(W, n, 3), device=dev)
    ga = VerletGhosts(torch, float(script.get_rcut()), 1.0, (True, True, True))
    x_all, m_all, nl_all = ga.update(allc, torch.as_tensor(cells, device=dev))
    t_all = torch.zeros_like(m_all)
    ch = {}
    r["chunks_script"] = ch
    for k in [int(c) for c in args.dyn_chunks.split(",") if int(c) <= W]:
        x = (x_all[:k], t_all[:k], nl_all[:k], m_all[:k])
        try:
            t, _ = timed(torch, lambda: force(script, x), reps=2, warm=1)
            mem = peak_per_atom(torch, lambda: force(script, x), k * n)
            ch[k] = {"us_per_atom": 1e6 * t / (k * n), "peak_bytes_per_atom": mem}
        except Exception as err:  # out of memory at the largest
            ch[k] = {"error": f"{type(err).__name__}: {str(err)[:100]}"}
        torch.cuda.empty_cache()
        print("dyn chunk", k, ch[k], flush=True)
        save()

    variant("eager", dynamic_sel_model(path, dev, script=False))
    torch.backends.cuda.matmul.allow_tf32 = True
    variant("script_tf32", script)
    torch.backends.cuda.matmul.allow_tf32 = False
    m = dynamic_sel_model(path, dev, script=False)
    compile_repflow_layers(m)  # what DeepmdProvider(compile=True) runs (also sets the dynamo options)
    variant("compile_layers", m)
    del m
    m = dynamic_sel_model(path, dev, script=False)
    rf = m.atomic_model.descriptor.repflows
    rf.forward = torch.compile(rf.forward, dynamic=True)
    variant("compile_repflows", m)
    del m


if __name__ == "__main__":
    sys.exit(main())
