#!/bin/bash
# Nsight Compute on one engine force call (256 x 108 Cu atoms, mixed, tabulated embedding by
# default): pass 1 times every kernel of the call (gpu__time_duration) and ranks them by name;
# pass 2 profiles the hottest one with the SpeedOfLight, memory, compute, occupancy and launch
# sections. Needs ncu (CUDA toolkit) and the .whl/ wheels (ase, array_api_compat) and models.
#   bash bench/profiling/ncu_engine.sh [extra ncu_call.py args, e.g. --precision double]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/ase-*.whl \
    .whl/array_api_compat-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/bench
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
CALL="python3 bench/profiling/ncu_call.py .whl/models/cu_float32_1/model.dp --compress 2.0 $*"
$NCU --profile-from-start off --metrics gpu__time_duration.sum --csv --page raw $CALL \
    > "$OUT/ncu_times.csv" 2> "$OUT/ncu_times.err" || { tail -5 "$OUT/ncu_times.err"; exit 1; }
python3 bench/profiling/ncu_summary.py "$OUT/ncu_times.csv" --json "$OUT/ncu_times.json" > "$OUT/ncu_rank.txt"
cat "$OUT/ncu_rank.txt"
# the hottest kernel overall and the hottest of the engine's own kernels
for HOT in $(awk '/^HOTTEST/ {print $2}' "$OUT/ncu_rank.txt" | sort -u); do
    $NCU --profile-from-start off --kernel-name "$HOT" --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy \
        --section LaunchStats $CALL > "$OUT/ncu_$HOT.txt" 2>&1
    echo "== $HOT"; grep -v "^==" "$OUT/ncu_$HOT.txt" | grep -v "^ *---" | grep -v "^ *$" | head -90
done
