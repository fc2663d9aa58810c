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
# trees left. XBUDGET, XPLAN, AB_MORE: attn_layer_gpu.sh's (defaults here: 200 s; nets, LAMMPS and compressed;
# layer_tab). Writes $OUT/all.tgz (trees/: trees.json, trees.log; g/: attn_layer_gpu.sh's files; best.txt): one file,
# whatever the number of trees, made anew after the trees and after each stage (the files themselves are kept in
# /tmp/attn_layer_pick_work), so that a call cut short by the device brings back what was done. A tree whose probe
# errors against FP64 are not finite or more than 4x the baseline's is never picked.
set -uo pipefail
OUT=${OUT:-/tmp/attn_layer_pick}
export REPO=$(pwd)
O=$OUT W=/tmp/attn_layer_pick_work
rm -rf "$W" && mkdir -p "$O" "$W"
# shellcheck source=pack_out.sh
source "$REPO/bench/profiling/pack_out.sh"
OUT=$W/trees bash bench/profiling/attn_layer_trees.sh "$@"
snap "$W" "$O"
best=$(python3 - "$W/trees/trees.json" "$@" <<'PY'
import json, math, pathlib, sys
d = json.loads(pathlib.Path(sys.argv[1]).read_text())
names = [pathlib.Path(a).name for a in sys.argv[2:]]
us = {k: d[k]["us_per_centre_layer"]["fused_fwd_keep"] + d[k]["us_per_centre_layer"]["fused_bwd"]
      for k in names if k in d}
def errs(k):
    return {e: v for e, v in d[k].get("rel_err_vs_fp64", {}).items() if e.startswith("fused")}
base = errs(names[0]) if names[0] in d else {}
def sound(k):  # finite errors, none past 4x the baseline's
    return all(v is not None and math.isfinite(v) and (e not in base or v <= 4 * base[e] + 1e-12)
               for e, v in errs(k).items())
bad = [k for k in us if not sound(k)]
if bad:
    print("not picked (probe errors): " + " ".join(bad), file=sys.stderr)
pool = [k for k in names[1:] if k in us and k not in bad] or [k for k in us if k not in bad]
print(min(pool, key=us.get) if pool else "")
PY
)
echo "best: ${best:-none (no probe ran, or none sound)} after $SECONDS s" | tee "$W/best.txt"
for a in "$@"; do [ "$(basename "$a")" = "$best" ] && cp -r "$a/src/." src/; done
for s in ${STAGES:-explore tests ab}; do
  left=$(( ${LIMIT:-575} - SECONDS )); [ $left -gt 20 ] || { echo "stage $s skipped: LIMIT"; continue; }
  OUT=$W/g XBUDGET=${XBUDGET:-200} AB_MORE=${AB_MORE:-layer_tab} \
    XPLAN=${XPLAN:-"builtin:se_atten_v2:tf32layer lammps:se_atten_v2:1 builtin:se_atten_v2_c:tf32layer"} \
    timeout $left bash bench/profiling/attn_layer_gpu.sh "$s"
  snap "$W" "$O"
done
echo "total: $SECONDS s"
ls -la "$O"
