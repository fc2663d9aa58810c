"""EngineSettings (engine/settings.py): one typed settings object, parsed once and passed down; no
module of the engine reads the environment; no import cycle among the engine's modules."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import platform
import subprocess
import sys

import pytest

from dpsnake.engine.settings import FAMILIES, EngineContext, EngineSettings

ENGINE = pathlib.Path(__file__).resolve().parents[1] / "src" / "dpsnake" / "engine"


def test_settings_round_trip():
    s = EngineSettings(tf32=True, chunk_mb=512.0, fast=frozenset({"nets", "env"}), select="thread", fused="off")
    d = json.loads(json.dumps(s.to_dict()))
    assert EngineSettings.from_dict(d) == s
    assert EngineSettings(**EngineSettings().to_dict()) == EngineSettings()
    assert hash(s) == hash(EngineSettings.from_dict(d))  # frozen: a dict key
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tf32 = False
    assert s.replace(tf32=False).tf32 is False and s.tf32 is True


@pytest.mark.parametrize(
    "bad", [{"select": "block"}, {"fused": "1"}, {"fast": {"nope"}}, {"tab_lps": 3}, {"chunk_mb": 0.0}, {"widths": "x"}]
)
def test_settings_are_checked(bad):
    with pytest.raises(ValueError):
        EngineSettings(**bad)
    with pytest.raises(ValueError, match="unknown settings"):
        EngineSettings.from_dict({"nope": 1})


def test_from_env_maps_the_former_variables():
    assert EngineSettings.from_env({}) == EngineSettings()
    env = {
        "DPSNAKE_TF32": "1",
        "DPSNAKE_CHUNK_MB": "100",
        "DPSNAKE_KERNELS": "0",
        "DPSNAKE_FAST": "nets,desc,bogus",
        "DPSNAKE_SELECT": "thread",
        "DPSNAKE_FUSED": "0",
        "DPSNAKE_FUSED_BWD_MINB": "",
        "DPSNAKE_TAB_LPS": "4",
        "DPSNAKE_DESC": "elementwise",
        "DPSNAKE_COMPACT": "0",
        "DPSNAKE_WIDTHS": "exact",
    }
    s = EngineSettings.from_env(env)
    assert s == EngineSettings(
        tf32=True,
        chunk_mb=100.0,
        kernels=False,
        fast=frozenset({"nets", "desc"}),
        select="thread",
        fused="off",
        tab_kernels=False,  # FUSED=0 turned the tabulated kernels off too
        fused_bwd_minb=0,
        tab_lps=4,
        desc="elementwise",
        compact=False,
        widths="exact",
    )
    assert EngineSettings.from_env({"DPSNAKE_FAST": "0"}).fast == frozenset()
    assert EngineSettings.from_env({"DPSNAKE_FUSED": "1"}) == EngineSettings(fused="on")


def test_parse_of_bench_arguments():
    s = EngineSettings.parse(["compact=0", "fast=nets,env", "chunk_mb=none", "fused_bwd_minb=4", "select=thread"])
    assert s == EngineSettings(compact=False, fast=frozenset({"nets", "env"}), fused_bwd_minb=4, select="thread")
    assert EngineSettings.parse(["fast=all"]).fast == frozenset(FAMILIES)
    assert "attn_core" in FAMILIES and "attn_core" not in EngineSettings().fast  # slower so far: opt-in
    assert EngineSettings.parse(["fast=0"]).fast == frozenset()
    with pytest.raises(ValueError):
        EngineSettings.parse(["nope=1"])
    with pytest.raises(ValueError):
        EngineSettings.parse(["compact=maybe"])


def test_context_switches_follow_the_settings():
    import numpy as np

    class cupy:  # only the name matters to the switches
        __name__ = "cupy"

    ctx = EngineContext(EngineSettings(fast=frozenset({"env"}), fused="auto"))
    assert ctx.fast(cupy, "env") and not ctx.fast(cupy, "nets") and not ctx.fast(np, "env")
    assert ctx.fused(cupy, "float32") and not ctx.fused(cupy, "float64") and ctx.tab_kernels(cupy)
    assert not EngineContext(EngineSettings(kernels=False)).fused(cupy, "float32")
    assert ctx.guarded("env", lambda: 1 / 0) is None and not ctx.fast(cupy, "env")  # switched off
    assert EngineContext().select_mode() == "warp"
    ctx.broken.add("select_warp")
    assert ctx.select_mode() == "thread"


def test_ensemble_takes_settings(cu_model):
    from dpsnake import DeepPot
    from dpsnake.engine.ensemble import Ensemble
    from dpsnake.errors import UserError

    ens = Ensemble([cu_model["dp"]], settings={"compact": False}, tf32=True)
    assert ens.settings == EngineSettings(compact=False, tf32=True) and ens.ctx.settings is ens.settings
    assert Ensemble([cu_model["dp"]]).settings == EngineSettings()
    assert DeepPot(cu_model["dp"], settings=EngineSettings(widths="exact")).ensemble.settings.widths == "exact"
    with pytest.raises(UserError, match="settings:"):
        Ensemble([cu_model["dp"]], settings={"select": "nope"})


def _sources():
    return sorted(p for p in ENGINE.rglob("*.py"))


def test_no_engine_module_reads_the_environment():
    for path in _sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
                pytest.fail(f"{path.relative_to(ENGINE)}:{node.lineno} reads the environment (os.{node.attr})")


def test_no_module_level_mutable_state_in_the_engine():
    """No module-level cache or switch (a name bound to an empty dict / set / list, filled later):
    state lives in the EngineContext of an ensemble. Compile caches (functools.cache on pure
    functions of their arguments) and constant tables stay."""
    for path in _sources():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                v = node.value
                empty = (isinstance(v, ast.Dict) and not v.keys) or (isinstance(v, (ast.List, ast.Set)) and not v.elts)
                made = isinstance(v, ast.Call) and getattr(v.func, "id", "") in ("dict", "set", "list") and not v.args
                assert not (empty or made), f"{path.relative_to(ENGINE)}:{node.lineno}: module-level mutable state"


def test_no_import_cycle_among_engine_modules():
    """Module-level and function-level imports among dpsnake.engine modules form no cycle."""
    graph = {}
    for path in _sources():
        rel = path.relative_to(ENGINE.parent.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpsnake.engine"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if (ENGINE.parent.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("dpsnake.engine")}
        graph[name] = {d for d in deps if d != name}
    # a package's __init__ importing nothing of its modules: edges into a package are leaves
    state = {}

    def visit(n, stack):
        state[n] = 1
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(d) :], d]))
            if d in graph and not state.get(d):
                visit(d, [*stack, d])
        state[n] = 2

    for n in graph:
        if not state.get(n):
            visit(n, [n])


def test_explore_passes_the_users_accuracy_settings(cu_model):
    """`explore.tf32` / `dpsnake explore --tf32` reach the ensemble's settings; the explorer's integrator
    is made from the provider's settings; `--async-frames` picks the frame writer."""
    import argparse

    import numpy as np

    from dpsnake.md import explore, graphs, integrators
    from dpsnake.md.explorer import Explorer

    parser = argparse.ArgumentParser()
    explore.add_arguments(parser)
    base = ["--models", "m.dp", "--walkers", "w.json", "--outdir", "o"]
    args = parser.parse_args([*base, "--tf32", "--async-frames", "off"])
    assert args.tf32 and args.async_frames == "off"
    assert not parser.parse_args(base).tf32 and parser.parse_args(base).async_frames == "auto"
    prov, type_map = explore.make_provider([cu_model["dp"]], "mixed", np, tf32=args.tf32)
    assert prov.settings.tf32 and type_map == ["Cu"]
    assert not explore.make_provider([cu_model["dp"]], "mixed", np)[0].settings.tf32
    ex = Explorer([], prov, type_map, "unused", xp=np, progress=False, async_frames=False)
    assert ex._md_step is graphs.make_stepper(np, prov.settings) is integrators.md_step
    assert ex.async_frames is False and Explorer([], prov, type_map, "unused", xp=np).async_frames is False


def test_explorer_reads_no_environment():
    md = ENGINE.parent / "md"
    for path in (md / "explorer.py", md / "explore.py", md / "graphs.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                pytest.fail(f"md/{path.name}:{node.lineno} reads the environment (os.{node.attr})")


def test_fp64_nets_run_fused_in_small_chunks_only():
    """fused "auto": FP64 nets take the fused kernels in chunks of at most fused_fp64_atoms centres
    (launch-bound calls), cuBLAS above; FP32 nets always; tabulated nets keep their kernels."""
    import types

    import numpy as np

    from dpsnake.engine.descriptor import RuntimeModel

    gpu = types.SimpleNamespace(__name__="cupy")  # only the namespace's name decides here
    ctx = EngineContext(EngineSettings())
    assert ctx.fused_small(gpu, "float64") == 1024 and not ctx.fused(gpu, "float64")
    assert ctx.fused_small(gpu, "float32") == 0 and ctx.fused(gpu, "float32")
    assert ctx.fused_small(np, "float64") == 0
    for settings in (EngineSettings(fused="on"), EngineSettings(fused="off"), EngineSettings(fused_fp64_atoms=0)):
        assert EngineContext(settings).fused_small(gpu, "float64") == 0
    assert EngineContext(EngineSettings(fused="on")).fused(gpu, "float64")
    rm = RuntimeModel(
        model=None,
        xp=gpu,
        dtype=np.float64,
        davg=None,
        rstd=None,
        embeddings=[],
        fittings=[],
        bias=np.zeros(1),
        fused=["table", None],
        fused_small=["table", "fused net"],
        small_max=2048,
    )
    assert rm.kernels_for(256) == rm.kernels_for(2048) == ["table", "fused net"]
    assert rm.kernels_for(2049) == ["table", None]
    assert RuntimeModel(None, gpu, np.float64, None, None, [], [], np.zeros(1)).kernels_for(10) is None


_FAULTS = """
import resource, sys, numpy as np
from dpsnake.engine.ensemble import EnsembleBase
from dpsnake.engine.settings import EngineSettings


class Probe(EnsembleBase):  # only the runtime cache of an ensemble, no model
    runtime_cls = type("R", (), {"build": classmethod(lambda cls, *a, **k: "runtime")})


how = sys.argv[1]
if how == "call":
    from dpsnake.engine.xp import keep_freed_memory

    assert keep_freed_memory()
elif how.startswith("ensemble"):  # an ensemble's first NumPy call, keep_heap on / off
    e = Probe.__new__(Probe)
    e.settings, e._runtime, e.models = EngineSettings(keep_heap=how == "ensemble1"), {}, [None]
    e.precision, e.compress, e.ctx = "double", None, None
    assert e._rt(np, 0) == "runtime"


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


a = np.ones(1 << 20); del a  # 8 MB: one block of a chunk's temporaries
f0 = faults()
for _ in range(20):
    a = np.ones(1 << 20); del a
print(faults() - f0)
"""


def _faults(how: str) -> int:
    """Page faults of 20 allocations of a freed 8 MB block in a fresh process (the allocator setting
    is process-wide) after ``how``: "none", "call" (keep_freed_memory), "ensemble1" / "ensemble0" (an
    ensemble's first NumPy call with keep_heap on / off)."""
    out = subprocess.run([sys.executable, "-c", _FAULTS, how], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_reuses_freed_blocks():
    """With keep_freed_memory a freed 8 MB temporary is reused: no page faults on the next ones;
    without it each is a fresh mapping that the kernel zero-fills (the cost that halved the NumPy
    path's speed). An ensemble's first NumPy call sets it unless EngineSettings keep_heap is off."""
    without = _faults("none")
    assert without >= 20, without  # at least one fault per fresh mapping
    assert _faults("call") * 10 < without
    assert _faults("ensemble1") * 10 < without
    assert _faults("ensemble0") >= 20
