#!/usr/bin/env bash
# Issue 21's whole-layer TF32 attention kernels (cuda/attn_layer.cu) measured on the lent GPU in one device call
# (~3.5 min with the wheel install on an H100): where each kernel spends its cycles, the kernels against the cuBLAS
# TF32 path (deep rings, two-stage ring, no ring), the force call against DeePMD-kit, and the GPU tests (the
# emulated ones run on the CPU machines). From the repository root, `.whl` carried (bench/gpu_install.sh):
#
#   bash bench/profiling/attn_layer_gpu.sh [STAGES]     STAGES: any of phases probe ab tests ncu explore (default:
#                                                        the first four; ncu: Nsight Compute on the probe's first
#                                                        six layer launches: forward keeping (no ring), forward
#                                                        alone with the deep rings, then two-stage, two layers
#                                                        each; explore: issue 21's exploration against LAMMPS,
#                                                        ~150 s, bench/bench_explore_deepmd_gpu.sh's short case)
#
# PROBE_MORE: more arguments of the probe stage (e.g. "--variants tf32bwd tf32": only those A/B variants).
# NCU_KERNEL, NCU_COUNT, NCU_MORE: the ncu stage's kernel regex (attn_layer), launches (6) and more arguments (e.g.
# NCU_KERNEL=attn_layer_bwd NCU_COUNT=2 NCU_MORE="--section SourceCounters": the backward, stalls by instruction).
# XPLAN: the explore stage's plan (default "builtin:se_atten_v2:tf32layer lammps:se_atten_v2:1"; a kind KIND_c:
# our engine compressed, e.g. builtin:se_atten_v2_c:tf32layer).
# XBUDGET: the explore stage's budget in seconds (200).
# AB_MORE: more arguments of the ab stage's bench_engine_attn_ab.py (e.g. "layer_nonet --profile layer": one more
# variant, and the torch profile of one call of the default).
# Writes under $OUT (default /tmp/attn_layer_gpu): attn_layer_phases_<gpu>.json, attn_layer_probe_<gpu>.json,
# ab/ (bench_engine_attn_ab.py's JSON; its log ab.log), tests.log, ncu.txt, x/ (explore_deepmd_<gpu>.json,
# lammps_explore.jsonl) and explore.log, nothing else (the device returns at most 8 files: ab, tests and explore
# are 6); prints each stage's table and its wall time.
set -uo pipefail
OUT=${OUT:-/tmp/attn_layer_gpu}
STAGES=${*:-phases probe ab tests}
mkdir -p "$OUT" /tmp/pycache && touch /tmp/pycache/.done
export REPO=$(pwd)
# shellcheck source=../gpu_install.sh
source bench/gpu_install.sh > /tmp/attn_layer_gpu_install.log 2>&1 || { tail -5 /tmp/attn_layer_gpu_install.log; exit 1; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E 'h100|h200|a100|l40s' | tr A-Z a-z)
GPU=${GPU:-gpu}
T0=$(date +%s)
for s in $STAGES; do
  t=$(date +%s)
  case $s in
    phases) timeout 200 python3 bench/profiling/attn_layer_phases.py --out "$OUT/attn_layer_phases_$GPU.json" ;;
    probe) timeout 200 python3 bench/profiling/attn_layer_probe.py ${PROBE_MORE:-} --out "$OUT/attn_layer_probe_$GPU.json" ;;
    ab) timeout 240 python3 bench/bench_engine_attn_ab.py --attn-layer 2 --walkers 256 --reps 5 \
          --variants trim tf32 layer ${AB_MORE:-} --deepmd --deepmd-fp32 --out "$OUT/ab" > "$OUT/ab.log" 2>&1
        rm -f "$OUT"/ab/*.pth "$OUT"/ab/*.dp  # its models: the device returns at most 8 files
        grep -E "us/atom|Error|error" "$OUT/ab.log" | tail -10 ;;
    tests) timeout 300 python3 -m pytest -q -s tests/test_engine_attn_layer.py tests/test_engine_attn_gpu.py \
             tests/test_engine_attn_tab_gpu.py -k "on_gpu or cupy or tf32_context or kernels_off" > "$OUT/tests.log" 2>&1
           grep -E "attn_layer TF32|cuBLAS TF32|passed|failed|Error|assert" "$OUT/tests.log" | tail -30 ;;
    ncu) NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
         timeout 200 "$NCU" --kernel-name regex:${NCU_KERNEL:-attn_layer} --launch-count ${NCU_COUNT:-6} \
           --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
           ${NCU_MORE:-} \
           python3 bench/profiling/attn_layer_probe.py --reps 1 > "$OUT/ncu.txt" 2>&1
         grep -E "attn_layer_|Duration|Throughput|Busy|Hit Rate|Warp Cycles Per Issued|Achieved Active|Stall" \
           "$OUT/ncu.txt" | cut -c1-150 | head -90 ;;
    explore) (OUT=$OUT/x KINDS=se_atten_v2 TRAIN_STEPS=30 BUDGET_S=${XBUDGET:-200} STEPS_SE=60 FORCE_SE=10 EXTRA_WHL="" \
               PLAN="${XPLAN:-builtin:se_atten_v2:tf32layer lammps:se_atten_v2:1}" \
               timeout 400 bash bench/bench_explore_deepmd_gpu.sh > "$OUT/explore.log" 2>&1)
             rm -f "$OUT"/x/lammps_*.log  # LAMMPS's own log: many lines, not needed
             python3 - "$OUT/x" <<'PY'
import json, pathlib, sys
x = pathlib.Path(sys.argv[1])
ours = [json.loads(f.read_text()) for f in x.glob("explore_deepmd_*.json")]
lam = [json.loads(l) for l in (x / "lammps_explore.jsonl").read_text().splitlines() if l.startswith("{")] \
    if (x / "lammps_explore.jsonl").exists() else []
ref = lam[0]["us_per_atom_step"] if lam else float("nan")
for k, v in (ours[0] if ours else {}).items():
    if k.startswith("builtin_") and isinstance(v, dict) and "us_per_atom_step" in v:
        us = v["us_per_atom_step"]["explore"]
        print(f"exploration {k} {us:.3f} us/atom-step vs LAMMPS {ref:.1f}: {ref / us:.1f}x")
PY
             ;;
    *) echo "unknown stage $s (phases probe ab tests ncu explore)"; exit 2 ;;
  esac
  echo "== $s: $(( $(date +%s) - t )) s (total $(( $(date +%s) - T0 )) s)"
done
