#!/usr/bin/env bash
# The embedded demo on one GPU (issue 17): `train.backend: pt`, exploration on CuPy, four iterations,
# from empty results; writes the per-rule wall times (Snakemake's benchmarks/iter.N/*.tsv), the wall time
# per stage and per iteration and the total as JSON, plus the logs of one train job.
#
#   bash bench/demo_gpu.sh                      # on the GPU machine (run from the repo root; writes $OUT)
#   NUM_WORKERS=4 PROFILE=profiles/local bash bench/demo_gpu.sh   # as before issue 17's changes
#   PROFILE=profiles/local CAP=40 PROBE=1 PSTEPS=150 TAG=before bash bench/demo_gpu.sh   # 40 s of the old
#       run, then one training job alone in 4 setups + one explore job (what docs/benchmarks.md shows)
#   ITERS=1 STEPS=40 INIT_STEPS=20 NSTEPS=60 EXPLORE_DEVICE=cpu bash bench/demo_gpu.sh   # shrunk, on a CPU
# The full 4-iteration run needs ~6 min with profiles/gpu (368 s wall on the H200, 2026-12-04): a call of its own.
#
# Software on the GPU machine (no network): the image's python3 (torch 2.11 cu130, CuPy 14, numpy, h5py,
# scipy, pandas, matplotlib, pyyaml, tqdm, jinja2, ...) plus wheels carried in .whl/ (deepmd-kit 3.2 and
# its pure-Python needs, mpich, dpdata, ase) and .whl2/ (snakemake 9 and its needs; PuLP without its
# non-x86-64 CBC binaries): `run` with carry [".whl", ".whl2"]. Make .whl2 here (Python 3.12 on the
# GPU machine): `pip download snakemake==9.27.1 lmdb einops msgpack ml_dtypes mendeleev --only-binary=:all:
# --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --platform
# manylinux2014_x86_64 --platform any -d .whl2` (connection_pool 0.0.3 is an sdist: `pip wheel --no-deps` it
# into .whl2 first and add `-f .whl2`), then drop numpy/pandas (the image has them), pulp's solverdir/cbc
# (the greedy scheduler needs no solver; `wheel unpack`, rm, `wheel pack`) and every project .whl/ already
# holds (sqlalchemy, pint, pyfiglet, deprecated, flexcache, flexparser, platformdirs: two versions of one
# project in the one `pip install` stop it with ResolutionImpossible): 12-14 MB, .whl + .whl2 47-60 MiB of the
# 64-MiB carry. DeePMD-kit 3.2's trainer imports lmdb and mendeleev. The install itself: bench/gpu_install.sh.
# INSTALL=0 skips the install (a machine
# where all of it is already importable, e.g. this repo's CPU dev machine).
# Env: PROFILE (profiles/gpu), ITERS (4), STEPS / INIT_STEPS (config's 1500 / 1000), NSTEPS (explore
# steps per stage, config's 600), EXPLORE_DEVICE (gpu), TRAIN_DEVICE (gpu), WORK (/tmp/dpsnake_demo), OUT (where the JSON goes),
# TAG (name of the JSON), EXTRA (more snakemake arguments).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${PROFILE:-profiles/gpu}
ITERS=${ITERS:-4}
EXPLORE_DEVICE=${EXPLORE_DEVICE:-gpu}
WORK=${WORK:-/tmp/dpsnake_demo}
OUT=${OUT:-$REPO/gpu_out}
TAG=${TAG:-demo_gpu}
INSTALL=${INSTALL:-1}
mkdir -p "$OUT"
# everything printed also goes to $OUT (kept even when the device call runs out of time: give `run` a
# timeout_s above install + CAP + ~30 s, and two invocations (PROBE=1 + a run) each their own share)
exec > >(tee -a "$OUT/${TAG}.out") 2>&1
T0=$(date +%s.%N)

[ "$INSTALL" = 1 ] && { source "$REPO/bench/gpu_install.sh" || exit 1; }
T_INSTALL=$(python3 -c "import time; print(round(time.time() - $T0, 1))")
echo "install: ${T_INSTALL} s"
python3 - <<'EOF' || exit 1
import time; t = time.time()
import torch, deepmd.pt, snakemake, dpsnake, ase, dpdata  # noqa: F401
print(f"imports ok ({time.time() - t:.1f} s): torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
      f"snakemake {snakemake.__version__}")
EOF
# bytecode of the image's packages and of ours (gpu_install.sh compiles them)
python3 -c "
import importlib.util, pathlib, sys
for m in ('torch', 'cupy', 'numpy', 'deepmd', 'dpsnake', 'snakemake'):
    s = importlib.util.find_spec(m)
    d = pathlib.Path(s.origin).parent if s else None
    c = pathlib.Path(sys.pycache_prefix + str(d)) if d and sys.pycache_prefix else d
    print(f'bytecode {m}:', f\"{sum(1 for _ in c.rglob('*.pyc'))} .pyc for {sum(1 for _ in d.rglob('*.py'))} .py\" if d else 'absent')
"
if [ "$EXPLORE_DEVICE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'device(s)')" || exit 1
fi

# TRAIN_DEVICE: empty = what the profile says (profiles/gpu: CPU cores; profiles/local: DeePMD-kit's
# choice, the GPU), or gpu (all four trainings of an iteration on the GPU at once), gpu1 (on the GPU one
# at a time: Snakemake resource gpu=1), cpu (on CPU cores; exploration still on the GPU), auto (the
# fastest of those three in the probes of an earlier PROBE=1 run, $OUT/*_probe.jsonl)
TRAIN_DEVICE=${TRAIN_DEVICE:-}
if [ "$TRAIN_DEVICE" = auto ]; then
  TRAIN_DEVICE=$(cat "$OUT"/*_probe.jsonl 2>/dev/null | python3 -c "
import json, sys
p = {}
for ln in sys.stdin:
    try: d = json.loads(ln)
    except ValueError: continue
    if 'probe' in d: p[d['probe']] = d['wall_s']
t = {'gpu': p.get('gpu_nw0_x4'), 'gpu1': 4 * p['gpu_nw0'] if 'gpu_nw0' in p else None, 'cpu': p.get('cpu_t1_x4')}
t = {k: v for k, v in t.items() if v}
print(min(t, key=t.get) if t else 'gpu')
print('auto choice from probes:', t, file=sys.stderr)")
fi
export TRAIN_DEVICE; echo "train device: ${TRAIN_DEVICE:-as the profile says}"
case "$TRAIN_DEVICE" in
  cpu) EXTRA="${EXTRA:-} --set-resources train:train_on_cpu=1" ;;
  gpu) EXTRA="${EXTRA:-} --set-resources train:train_on_cpu=0" ;;
  gpu1) EXTRA="${EXTRA:-} --resources gpu=1 --set-resources train:train_on_cpu=0 train:gpu=1" ;;
esac

# the embedded demo config with backend pt and exploration on the GPU (nothing else changed unless the
# shrinking variables are set)
rm -rf "$WORK"; mkdir -p "$WORK"
# a fresh CuPy kernel cache per run: the first explore job compiles the engine's kernels, as on a new
# machine (KEEP_CUPY_CACHE=1 keeps ~/.cupy's)
[ "${KEEP_CUPY_CACHE:-0}" = 1 ] || export CUPY_CACHE_DIR=$WORK/cupy_cache
python3 - "$REPO/config/config.yaml" "$WORK/demo_gpu.yaml" <<'EOF' || exit 1
import os, sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["train"]["backend"] = "pt"
cfg["explore"]["device"] = os.environ.get("EXPLORE_DEVICE", "gpu")
cfg["convergence"]["max_iterations"] = int(os.environ.get("ITERS", 4))
if os.environ.get("STEPS"):
    cfg["train"]["numb_steps"] = int(os.environ["STEPS"])
    cfg["train"]["input"]["training"]["save_freq"] = int(os.environ["STEPS"])
if os.environ.get("INIT_STEPS"):
    cfg["train"]["init_numb_steps"] = int(os.environ["INIT_STEPS"])
if os.environ.get("NSTEPS"):
    for st in cfg["explore"]["stages"]:
        st["nsteps"] = int(os.environ["NSTEPS"])
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
print("config:", {k: cfg[k] for k in ("train", "explore", "convergence")})
EOF

echo "=== snakemake --profile $PROFILE from empty results ($WORK)"
TS=$(date +%s.%N)
# CAP (s): stop the run (Snakemake and all its jobs: its own session) after that long; the partial
# timings still land in the JSON (the train logs print the wall time every disp_freq steps)
( cd "$WORK" && exec setsid snakemake -s "$REPO/Snakefile" --profile "$REPO/$PROFILE" \
    --configfile "$WORK/demo_gpu.yaml" ${EXTRA:-} > "$WORK/snakemake.log" 2>&1 ) &
SMK=$!
if [ -n "${CAP:-}" ]; then
  ( sleep "$CAP"; kill -KILL -- -$SMK 2>/dev/null && echo "stopped after CAP=$CAP s" ) &
  CAPPER=$!
fi
wait $SMK
RC=$?
[ -n "${CAP:-}" ] && kill $CAPPER 2>/dev/null
TE=$(date +%s.%N)
tail -5 "$WORK/snakemake.log"
echo "snakemake exit $RC"

# per-rule wall times -> JSON; the critical path of an iteration = plan || max(train), explore, select,
# max(label), collect (the stages are barriers in the DAG); iteration wall = between the newest outputs
python3 - "$WORK" "$OUT/$TAG.json" "$TS" "$TE" "$RC" "$T_INSTALL" "$PROFILE" <<'EOF'
import glob, json, os, re, sys, time
work, out, ts, te, rc, t_install, profile = sys.argv[1:8]
ts, te = float(ts), float(te)
res = {"profile": profile, "train_device": os.environ.get("TRAIN_DEVICE"),
       "num_workers": os.environ.get("NUM_WORKERS"), "rc": int(rc), "total_s": round(te - ts, 1), "install_s": float(t_install),
       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "iterations": {}}
for d in sorted(glob.glob(f"{work}/benchmarks/*")):
    it = os.path.basename(d)
    rules = {}
    for f in sorted(glob.glob(f"{d}/*.tsv")):
        name = os.path.basename(f)[:-4]
        rows = open(f).read().split("\n")
        vals = dict(zip(rows[0].split("\t"), rows[1].split("\t")))
        rules[name] = {"s": round(float(vals["s"]), 1), "max_rss": vals.get("max_rss"),
                       "cpu_time": vals.get("cpu_time")}
    stage = {}
    for name, v in rules.items():
        st = re.sub(r"\.\d+$", "", name)
        stage.setdefault(st, []).append(v["s"])
    stage_max = {k: max(v) for k, v in stage.items()}
    crit = max(stage_max.get("train", 0), stage_max.get("plan", 0)) + sum(
        stage_max.get(k, 0) for k in ("explore", "select", "label", "collect"))
    res["iterations"][it] = {"rules": rules, "stage_max_s": stage_max,
                             "stage_n": {k: len(v) for k, v in stage.items()},
                             "critical_path_s": round(crit, 1)}
# iteration walls from output mtimes: iteration N ends when results/data/iter.N is written
prev = ts
for it in sorted(k for k in res["iterations"] if k.startswith("iter.")):
    p = f"{work}/results/iter.{it[5:]}/collect/summary.json"
    if os.path.exists(p):
        end = os.path.getmtime(p)
        res["iterations"][it]["wall_s"] = round(end - prev, 1)
        prev = end
p = f"{work}/results/reports/index.html"
if os.path.exists(p):
    res["after_last_collect_s"] = round(os.path.getmtime(p) - prev, 1)
# inside the train jobs (DeePMD-kit's log timestamps): start-up, statistics, steps, freeze + convert
import datetime
def stamp(line):
    m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", line)
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None
res["train_logs"] = {}
for f in sorted(glob.glob(f"{work}/logs/iter.*/train.*.log")):
    lines = open(f, errors="replace").read().splitlines()
    marks, batches = {}, []
    for ln in lines:
        t = stamp(ln)
        if t is None:
            continue
        marks.setdefault("first", t)
        for key, pat in (("nstat", "Calculate neighbor statistics"), ("loaders", "Constructing DataLoaders"),
                         ("start_train", "Start to train"), ("saved", "Saved model to"),
                         ("frozen", "Saved frozen model")):
            if pat in ln:
                marks[key] = t
        if "DeePMD version" in ln and "saved" in marks:
            marks["freeze_start"] = t
        m = re.search(r"Batch\s+(\d+): total wall time = ([\d.]+) s", ln)
        if m:
            batches.append((int(m.group(1)), float(m.group(2))))
        m = re.search(r"average training time: ([\d.]+) s/batch", ln)
        if m:
            marks["avg_s_per_batch"] = float(m.group(1))
        marks["last"] = t
    it, name = f.split("/")[-2], os.path.basename(f)[:-4]
    d = {k: round(marks[b] - marks[a], 2) for k, a, b in (
        ("setup_to_stats_s", "first", "loaders"), ("stats_to_train_s", "loaders", "start_train"),
        ("train_s", "start_train", "saved"), ("freeze_convert_s", "saved", "last"),
        ("log_span_s", "first", "last")) if a in marks and b in marks}
    d["avg_s_per_batch"] = marks.get("avg_s_per_batch")
    d["batches"] = batches[-3:]
    job = res["iterations"].get(it, {}).get("rules", {}).get(name)
    if job and "log_span_s" in d:
        d["outside_log_s"] = round(job["s"] - d["log_span_s"], 2)  # python + torch + deepmd import, exit
    res["train_logs"][f"{it}/{name}"] = d
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({"total_s": res["total_s"], "rc": res["rc"], **{k: {"wall_s": v.get("wall_s"),
      "critical_path_s": v["critical_path_s"], "stage_max_s": v["stage_max_s"]}
      for k, v in res["iterations"].items()}}, indent=1))
EOF

# PROBE=1: after the run, one training job alone in several setups (same input.json as model 0 of
# iteration 0, PSTEPS steps), to see what the per-step time depends on; then one explore job on the GPU
if [ "${PROBE:-0}" = 1 ] && [ -f "$WORK/results/iter.000000/train/model.0/input.json" ]; then
  P=/tmp/probe; rm -rf $P; mkdir -p $P
  python3 - "$WORK/results/iter.000000/train/model.0/input.json" "$P/input.json" "${PSTEPS:-300}" <<'PYEOF'
import json, sys
inp = json.load(open(sys.argv[1])); n = int(sys.argv[3])
inp["training"].update(numb_steps=n, save_freq=n, disp_freq=100)
json.dump(inp, open(sys.argv[2], "w"), indent=1)
PYEOF
  probe() {  # name, copies, env assignments...
    local name=$1 n=$2; shift 2
    local t0=$(date +%s.%N) i
    for i in $(seq 1 $n); do
      mkdir -p $P/$name.$i; cp $P/input.json $P/$name.$i/
      ( cd $P/$name.$i && env "$@" python3 -c "from deepmd.main import main
main(['--pt', 'train', 'input.json', '--skip-neighbor-stat'])
main(['--pt', 'freeze', '-o', 'f.pth'])
main(['convert-backend', 'f.pth', 'model.dp'])" > log 2>&1 ) &
    done
    wait
    local t1=$(date +%s.%N)
    echo "{\"probe\": \"$name\", \"copies\": $n, \"env\": \"$*\", \"wall_s\": $(python3 -c "print(round($t1-$t0,1))"), \"avg_s_per_batch\": [$(grep -ho 'average training time: [0-9.]*' $P/$name.*/log | awk '{print $4}' | paste -sd,)]}" | tee -a "$OUT/${TAG}_probe.jsonl"
  }
  python3 -c "import time; t=time.time(); import torch; t1=time.time(); import deepmd.pt.entrypoints.main; t2=time.time(); torch.zeros(1, device='cuda' if torch.cuda.is_available() else 'cpu'); print(f'import torch {t1-t:.1f} s, deepmd.pt {t2-t1:.1f} s, cuda init {time.time()-t2:.1f} s')" | tee -a "$OUT/${TAG}_probe.jsonl"
  T1="OMP_NUM_THREADS=1 DP_INTRA_OP_PARALLELISM_THREADS=1 DP_INTER_OP_PARALLELISM_THREADS=1"
  probe gpu_nw0 1 $T1 NUM_WORKERS=0
  probe gpu_nw0_x4 4 $T1 NUM_WORKERS=0
  probe gpu_nw4_x4 4 $T1 NUM_WORKERS=4
  probe cpu_t1_x4 4 $T1 NUM_WORKERS=0 DEVICE=cpu
  if [ -f $P/gpu_nw0.1/model.dp ] && [ -f "$WORK/results/iter.000000/explore/walkers.json" ]; then
    m=$P/gpu_nw0.1/model.dp; t0=$(date +%s.%N)
    dpsnake explore --models $m $m $m $m --walkers "$WORK/results/iter.000000/explore/walkers.json" \
      --outdir $P/explore --engine auto --device $EXPLORE_DEVICE --precision double --no-progress > $P/explore.log 2>&1
    echo "{\"probe\": \"explore_first\", \"rc\": $?, \"wall_s\": $(python3 -c "print(round($(date +%s.%N)-$t0,1))")}" | tee -a "$OUT/${TAG}_probe.jsonl"
    tail -3 $P/explore.log
  fi
  ( cd $P && tar czf "$OUT/${TAG}_probe_logs.tar.gz" */log explore*.log 2>/dev/null )
fi

# logs: one train job per iteration (train.0), the explore logs, the Snakemake log, the config
( cd "$WORK" && tar czf "$OUT/${TAG}_logs.tar.gz" snakemake.log demo_gpu.yaml logs/iter.*/train.0.log \
    logs/iter.*/explore.log results/iter.*/train/model.0/lcurve.out results/iter.*/train/model.0/input.json \
    2>/dev/null )

exit $RC
