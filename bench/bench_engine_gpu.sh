#!/bin/bash
# The engine benchmark side by side with DeePMD-kit 3.2 (PyTorch DeepPot.eval) in one device run:
# installs the wheels carried in the git-ignored .whl/ (docs/benchmarks.md "Setup"; models from
# bench/make_models.py in .whl/models), then agreement checks and every engine case, with the nets
# and with tabulated embedding nets (min_nbor_dist 2.0 A; + TF32 fitting GEMMs in mixed), then the
# exploration MD benchmark (bench_md.py: NPT tabulated, NPT nets, NVT tabulated).
#   run (carry .whl): bash bench/bench_engine_gpu.sh [REPS...]   (default 4 8 12 21 34: 6,912 ... 4,243,968 atoms)
# Results: $OUT/engine_<device>.json, $OUT/md{_tab,,_tab_nvt}_<device>.json (copy them to bench/results/), $OUT/log.txt.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export BENCH_RESULTS=$OUT
REPS=${*:-4 8 12 21 34}
ls .whl/*.whl | grep -v -e mpich -e nvidia_cuda_runtime | xargs python3 -m pip install -q --no-index --no-deps \
    --no-compile --target /tmp/site || exit 1
python3 -m pip install -q --no-index --no-deps .whl/mpich-*.whl || exit 1
sed -i 's/CIBUILDWHEEL = 1/CIBUILDWHEEL = 0/' /tmp/site/deepmd/lib/run_config.ini
MPI=$(python3 -c 'import importlib.metadata as m; print([str(f.locate()) for f in m.files("mpich") if f.name.startswith("libmpi.so.12")][0])')
export LD_PRELOAD=$MPI PYTHONPATH=/tmp/site:$PWD/src
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv; } 2>&1 | tee -a "$OUT/log.txt"
python3 bench/bench_engine.py .whl/models --deepmd --reps $REPS --compress 2.0 \
    --check .whl/models/t_cu.dp .whl/models/t_cuni.dp .whl/models/t_tos32.dp 2>&1 | tee -a "$OUT/log.txt"
# the MD overhead target: 256 walkers x 108 atoms, NPT (and NVT), 4 models, deviation every 10 steps
for run in "--compress 2.0" "" "--compress 2.0 --ensemble nvt"; do
    python3 bench/bench_md.py .whl/models/cu_float32_{1,2,3,4}/model.dp --walkers 256 --rep 3 --steps 200 \
        --rounds 5 --device gpu $run 2>&1 | tee -a "$OUT/log.txt"
done
