#!/usr/bin/env bash
# Where one training job of the GPU demo spends its time on the GPU machine (issue 17): Python start-up
# and imports (with and without compiled bytecode), `dpsnake train` before DeePMD-kit's first line, and a
# cProfile of DeePMD-kit's PyTorch training steps on one CPU core as profiles/gpu trains.
#
#   bash bench/profiling/train_job_profile.sh      # on the GPU machine, repo root; `run` with carry .whl .whl2
#   INSTALL=0 EXPLORE_DEVICE=cpu bash bench/profiling/train_job_profile.sh   # a CPU machine with it all installed
#
# It first runs a shrunk demo (1 iteration, 100 steps; bench/demo_gpu.sh installs the wheels) for the
# data and the input.json of a real training job. Writes $OUT/train_profile.txt (and importtime logs).
# About 5-6 minutes on the H200 machine (PSTEPS=100, LSTEPS=1500): give `run` timeout_s 600.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$REPO/gpu_out}
PSTEPS=${PSTEPS:-100}   # steps under cProfile (LSTEPS: steps of the timed runs, 1500)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/train_profile.txt") 2>&1
ITERS=1 STEPS=100 INIT_STEPS=50 NSTEPS=60 TAG=tiny WORK=/tmp/tiny bash "$REPO/bench/demo_gpu.sh" >/dev/null 2>&1
echo "shrunk demo: $(python3 -c "import json; print(json.load(open('$OUT/tiny.json'))['rc'])" 2>&1)"
# the environment demo_gpu.sh's install set up (the wheels are installed by then), for this shell too
[ "${INSTALL:-1}" = 1 ] && { source "$REPO/bench/gpu_install.sh" || exit 1; }

echo "=== bytecode: PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}," \
  "sys.flags.dont_write_bytecode=$(python3 -c 'import sys; print(sys.flags.dont_write_bytecode)')," \
  "pyc files under /tmp/site: $(find /tmp/site -name '*.pyc' | wc -l), .py files: $(find /tmp/site -name '*.py' | wc -l)"
walls() {  # label, python code: wall time of 3 fresh processes
  local t i TIMEFORMAT=%R
  for i in 1 2 3; do
    t=$( { time python3 -c "$2" >/dev/null 2>&1; } 2>&1 )
    echo "$1 run $i: $t s"
  done
}
walls "python3 -c pass" "pass"
walls "import torch" "import torch"
walls "import dpsnake.cli + config + argcheck" "import dpsnake.cli, dpsnake.workflow.config, deepmd.utils.argcheck"
walls "import deepmd.pt.entrypoints.main" "import deepmd.pt.entrypoints.main"
python3 -X importtime -c "import deepmd.pt.entrypoints.main" 2> "$OUT/importtime_before.txt"
T=$(date +%s.%N); python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1
echo "compileall /tmp/site: $(python3 -c "import time; print(round(time.time() - $T, 1))") s," \
  "pyc files now $(find /tmp/site -name '*.pyc' | wc -l)"
walls "after compileall: import deepmd.pt.entrypoints.main" "import deepmd.pt.entrypoints.main"
python3 -X importtime -c "import deepmd.pt.entrypoints.main" 2> "$OUT/importtime_after.txt"
for f in before after; do
  echo "--- top imports by cumulative us ($f compileall)"
  sort -t'|' -k2 -n -r "$OUT/importtime_$f.txt" | head -25
done

# one whole `dpsnake train` job as the rule runs it (100 steps), timed from outside
M=/tmp/tiny/results/iter.000000/train/model.0
rm -rf /tmp/job && mkdir -p /tmp/job
T=$(date +%s.%N)
( cd /tmp/tiny && dpsnake train --config results/config.json --iter 0 --model 0 --outdir /tmp/job \
    --data results/data/init --threads 1 --on-cpu 1 > /tmp/job.log 2>&1 )
RC=$?
echo "dpsnake train (100 steps): $(python3 -c "import time; print(round(time.time() - $T, 1))") s wall, rc $RC"
head -3 /tmp/job.log; grep -m1 "DeePMD version" /tmp/job.log | cut -c1-60; grep "Start to train\|average training" /tmp/job.log

# cProfile of PSTEPS training steps, one core, as profiles/gpu trains
P=/tmp/prof && rm -rf $P && mkdir -p $P
python3 - "$M/input.json" "$P/input.json" "$PSTEPS" <<'EOF'
import json, sys
inp = json.load(open(sys.argv[1])); n = int(sys.argv[3])
inp["training"].update(numb_steps=n, save_freq=n, disp_freq=100)
json.dump(inp, open(sys.argv[2], "w"), indent=1)
EOF
( cd $P && CUDA_VISIBLE_DEVICES= DEVICE=cpu NUM_WORKERS=0 OMP_NUM_THREADS=1 DP_INTRA_OP_PARALLELISM_THREADS=1 \
  DP_INTER_OP_PARALLELISM_THREADS=1 python3 - <<'EOF'
import cProfile, pstats, io, time
from dpsnake.workflow.train_proc import serial_frame_loading
serial_frame_loading()
from deepmd.main import main
pr = cProfile.Profile(); t = time.time()
pr.enable(); main(["--pt", "train", "input.json"]); pr.disable()
print(f"train under cProfile: {time.time() - t:.1f} s")
for key in ("cumulative", "tottime"):
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats(key).print_stats(45); print(s.getvalue()[-9000:])
EOF
) 2>&1 | grep -v "^\[.*DEEPMD INFO.*\(batch\|trn\)" | tail -200
# seconds per 100 steps over LSTEPS steps: one training alone, then 4 at once (an iteration of profiles/gpu)
steps() {  # name, copies
  local name=$1 n=$2 i pids=""
  for i in $(seq 1 "$n"); do
    rm -rf "$P/$name$i" && mkdir -p "$P/$name$i"
    python3 - "$P/input.json" "$P/$name$i/input.json" "${LSTEPS:-1500}" <<'PYEOF'
import json, sys
inp = json.load(open(sys.argv[1])); n = int(sys.argv[3])
inp["training"].update(numb_steps=n, save_freq=n, disp_freq=100)
json.dump(inp, open(sys.argv[2], "w"), indent=1)
PYEOF
    ( cd "$P/$name$i" && CUDA_VISIBLE_DEVICES= DEVICE=cpu NUM_WORKERS=0 OMP_NUM_THREADS=1 timeout 300 python3 -c "
from dpsnake.workflow.train_proc import serial_frame_loading; serial_frame_loading()
from deepmd.main import main; main(['--pt', 'train', 'input.json'])" > log 2>&1 ) & pids="$pids $!"
  done
  wait $pids  # these trainings only
  for i in $(seq 1 "$n"); do
    echo "$name $i: s per 100 steps $(grep -o 'total wall time = [0-9.]*' "$P/$name$i/log" | awk '{print $5}' | tr '\n' ' ')|" \
      "$(grep -o 'average training time: [0-9.]*' "$P/$name$i/log")"
  done
}
steps alone 1
steps four 4
