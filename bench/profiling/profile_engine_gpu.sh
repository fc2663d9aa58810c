#!/bin/bash
# One device run of the engine's GPU checks and timings (see docs/benchmarks.md): NumPy vs CuPy
# agreement of every configuration of profile_engine.FAST_CONFIGS (array code, compact or every slot,
# fused embedding kernels) on the test and benchmark models, the stage profile and ablation (mixed
# and double), a per-function profile with CUDA_LAUNCH_BLOCKING=1, and bench_engine.py timings with
# the default settings, with every slot (--set compact=0) and without the fused embedding
# kernels (--set fused=off --set tab_kernels=0) (no DeePMD-kit: bench_engine_gpu.sh runs it side by side). Needs the git-ignored .whl/
# (ase and array_api_compat wheels, models/); writes under $OUT (default ./gpu_out).
#   bash bench/profiling/profile_engine_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/ase-*.whl \
    .whl/array_api_compat-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
M=.whl/models
F32=$M/cu_float32_1/model.dp
F64=$M/cu_float64_1/model.dp
LOG=$OUT/log.txt
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv; } 2>&1 | tee "$LOG"
echo "== check" | tee -a "$LOG"
timeout 240 python3 bench/profiling/profile_engine.py "$F64" --precision double --walkers 8 --repeat 1 \
    --check "$F32" $M/t_cu.dp $M/t_cuni.dp $M/t_tos32.dp --json "$OUT/check.json" 2>&1 | tee -a "$LOG"
echo "== profile mixed" | tee -a "$LOG"
timeout 90 python3 bench/profiling/profile_engine.py "$F32" --precision mixed --ablation --ops --json "$OUT/prof_mixed.json" \
    2>&1 | tee -a "$LOG"
echo "== bench" | tee -a "$LOG"
timeout 80 python3 bench/bench_engine.py $M --reps 4 8 --json "$OUT/bench.json" 2>&1 | tee -a "$LOG"
echo "== bench, every slot" | tee -a "$LOG"
timeout 80 python3 bench/bench_engine.py $M --reps 4 8 --set compact=0 --json "$OUT/bench_full.json" 2>&1 | tee -a "$LOG"
echo "== bench, no fused embedding kernels" | tee -a "$LOG"
timeout 80 python3 bench/bench_engine.py $M --reps 4 8 --set fused=off --set tab_kernels=0 --json "$OUT/bench_nofused.json" 2>&1 | tee -a "$LOG"
echo "== profile double" | tee -a "$LOG"
timeout 90 python3 bench/profiling/profile_engine.py "$F64" --precision double --ablation --ops --json "$OUT/prof_double.json" \
    2>&1 | tee -a "$LOG"
echo "== cprofile mixed (CUDA_LAUNCH_BLOCKING=1)" | tee -a "$LOG"
CUDA_LAUNCH_BLOCKING=1 timeout 30 python3 bench/profiling/profile_engine.py "$F32" --cprofile 30 2>&1 | tee -a "$LOG"
