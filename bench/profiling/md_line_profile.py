"""Per-line time of the exploration loop's own code (src/dpsnake/md), the device synchronised after
every line (bench/profiling/line_profile.py's LineTimer): 20 integrator steps with cached forces, then 20 steps of
Explorer.loop (force calls are charged to the provider's line). 256 walkers x 108 atoms, NPT, mixed.

    python bench/profiling/md_line_profile.py MODELS_DIR [--compress 2.0]      (MODELS_DIR/cu_float32_{1..4}/model.dp)
"""

import pathlib
import sys
import tempfile
import warnings

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))
import line_profile as lp

warnings.simplefilter("ignore", RuntimeWarning)
import cupy as cp
from ase.build import bulk

from dpsnake.md import integrators
from dpsnake.md.explore import make_provider
from dpsnake.md.explorer import Explorer
from dpsnake.md.walkers import parse_walkers

M = sys.argv[1] if len(sys.argv) > 1 else ".whl/models"
COMP = float(sys.argv[sys.argv.index("--compress") + 1]) if "--compress" in sys.argv else None
models = [f"{M}/cu_float32_{k}/model.dp" for k in (1, 2, 3, 4)]
provider, tmap = make_provider(models, "mixed", cp, COMP)
tmp = pathlib.Path(tempfile.mkdtemp())
a = bulk("Cu", "fcc", a=3.634, cubic=True).repeat(3)
a.write(tmp / "cu.extxyz", format="extxyz")


def walkers(n, steps):
    return parse_walkers(
        [
            dict(
                name=f"w{k}",
                structure=str(tmp / "cu.extxyz"),
                ensemble="npt",
                temperature=300.0,
                pressure=1.0,
                nsteps=steps,
                dt=0.001,
                trj_freq=10,
                seed=k,
            )
            for k in range(n)
        ]
    )


ex = Explorer(
    walkers(256, 200), provider, tmap, tmp / "run", xp=cp, progress=False, checkpoint_every=1e9, stop_after=30
)
ex.prepare()
ex.loop()
st = ex.st
cached = provider(st, False)
flags = st.flags()
MD = str(HERE.parents[1] / "src" / "dpsnake" / "md")
timer = lp.LineTimer(cp.cuda.runtime.deviceSynchronize, MD)


def steps():
    for k in range(20):
        integrators.md_step(st, lambda s, al: cached, k, flags)


timer.run(steps)
rows = sorted(timer.acc.items(), key=lambda kv: -kv[1])[:30]
tot = sum(timer.acc.values())
print(f"integrator traced total {tot / 20 * 1e3:.2f} ms/step")
import linecache

for (f, l), t in rows:
    print(f"{t / 20 * 1e3:7.3f} ms  {pathlib.Path(f).name}:{l}  {linecache.getline(f, l).strip()[:90]}")
# explore loop lines (force calls included in the calling line)
ex2 = Explorer(
    walkers(256, 200), provider, tmap, tmp / "run2", xp=cp, progress=False, checkpoint_every=1e9, stop_after=20
)
ex2.prepare()
t2 = lp.LineTimer(cp.cuda.runtime.deviceSynchronize, MD)
t2.run(ex2.loop)
rows = sorted(t2.acc.items(), key=lambda kv: -kv[1])[:25]
print(f"explore traced total {sum(t2.acc.values()) / 20 * 1e3:.2f} ms/step")
for (f, l), t in rows:
    print(f"{t / 20 * 1e3:7.3f} ms  {pathlib.Path(f).name}:{l}  {linecache.getline(f, l).strip()[:90]}")
