#!/usr/bin/env bash
# One device call that A/Bs the attention kernels of several source trees and then measures the fastest in full
# (session 41's call, docs/benchmarks.md): attn_layer_trees.sh's probe in each tree; the tree with the least
# force-call time per centre and layer (forward keeping + backward; the first tree, the baseline, never picked
# unless it is the only one) has its src copied over the checkout's; then attn_layer_gpu.sh's STAGES in the checkout
# (default "explore tests ab": the exploration against LAMMPS first, so that a call cut short keeps it). Make the
# trees in the ignored build/ and carry them with .whl:
#
#   for r in main s41-keepl; do rm -rf build/t_$r; mkdir -p build/t_$r && git archive $r src bench/profiling \
#     bench/benchutil.py | tar -x -C build/t_$r; done
#   bash bench/profiling/attn_layer_pick.sh build/t_main build/t_s41-keepl        (carry .whl build/t_main ...)
#
# LIMIT: seconds the whole call may take (default 575: the device's 600 less the packing); the stages get what the
# trees left. XBUDGET, XPLAN, AB_MORE: attn_layer_gpu.sh's (defaults here: 200 s; nets, LAMMPS, nets in one chunk
# of centres (chunk_mb 120000: the batch's 27,648 at the engine's estimate of 3.8 MB each), compressed;
# layer_tab). Writes $OUT/all.tgz (trees/: trees.json, trees.log; g/: attn_layer_gpu.sh's files; best.txt): one file,
# whatever the number of trees.
set -uo pipefail
OUT=${OUT:-/tmp/attn_layer_pick}
export REPO=$(pwd)
O=$OUT
mkdir -p "$O"
OUT=$O/trees bash bench/profiling/attn_layer_trees.sh "$@"
best=$(python3 - "$O/trees/trees.json" "$@" <<'PY'
import json, pathlib, sys
d = json.loads(pathlib.Path(sys.argv[1]).read_text())
names = [pathlib.Path(a).name for a in sys.argv[2:]]
us = {k: d[k]["us_per_centre_layer"]["fused_fwd_keep"] + d[k]["us_per_centre_layer"]["fused_bwd"]
      for k in names if k in d}
pool = [k for k in names[1:] if k in us] or list(us)
print(min(pool, key=us.get) if pool else "")
PY
)
echo "best: ${best:-none (no probe ran)} after $SECONDS s" | tee "$O/best.txt"
for a in "$@"; do [ "$(basename "$a")" = "$best" ] && cp -r "$a/src/." src/; done
OUT=$O/g XBUDGET=${XBUDGET:-200} AB_MORE=${AB_MORE:-layer_tab} \
  XPLAN=${XPLAN:-"builtin:se_atten_v2:tf32layer lammps:se_atten_v2:1 builtin:se_atten_v2:tf32layer:120000 builtin:se_atten_v2_c:tf32layer"} \
  timeout $(( ${LIMIT:-575} - SECONDS )) bash bench/profiling/attn_layer_gpu.sh ${STAGES:-explore tests ab}
echo "total: $SECONDS s"
source "$REPO/bench/profiling/pack_out.sh" && pack_out "$O"
