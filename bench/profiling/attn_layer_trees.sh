#!/usr/bin/env bash
# The attention kernels of several source trees A/B'd in one device call: bench/profiling/attn_layer_probe.py run in
# each tree, one after another on the same GPU (a branch against main, say). Make the trees here in the ignored
# build/ and carry them with .whl:
#
#   for r in main s37-coalesce; do mkdir -p build/t_$r && git archive $r src bench/profiling bench/benchutil.py \
#     | tar -x -C build/t_$r; done                               (1.6 MB a tree: up to seven fit with .whl)
#   bash bench/profiling/attn_layer_trees.sh build/t_main build/t_s37-coalesce      (carry .whl, build/t_main, ...)
#
# PROBE: the probe script, relative to a tree (default bench/profiling/attn_layer_probe.py; e.g.
# bench/profiling/strip_net_probe.py: the strip net's kernels; it takes no variants and prints its own table).
# VARIANTS: the probe's A/B variants in each tree (default: none, the shipped kernels only). Prints each tree's us
# per centre and layer (fused_fwd: the forward alone, fused_fwd_keep: a force call's forward, fused_bwd: its
# backward) and errors against FP64; writes $OUT/trees.json ({tree: its probe's JSON}) and the probes' output in
# $OUT/trees.log (OUT: /tmp/attn_layer_trees; two files, so that all come back from the device).
set -uo pipefail
OUT=${OUT:-/tmp/attn_layer_trees}
mkdir -p "$OUT" /tmp/pycache /tmp/attn_layer_trees_json && touch /tmp/pycache/.done
export REPO=$(pwd)
# shellcheck source=../gpu_install.sh
LOG=/tmp/attn_layer_trees_install.log
source bench/gpu_install.sh > $LOG 2>&1 || { tail -5 $LOG; exit 1; }
PROBE=${PROBE:-bench/profiling/attn_layer_probe.py}
ARGS=()  # attn_layer_probe.py: the variants (an empty --variants: none of them, the shipped kernels only)
[ "$PROBE" = bench/profiling/attn_layer_probe.py ] && ARGS=(--variants ${VARIANTS:-})
pat="fused${VARIANTS:+|${VARIANTS// /|}}"  # the table rows to print: fused_*, and each variant's
for d in "$@"; do
  name=$(basename "$d")
  tree=$(cd "$d" && pwd)
  (cd "$tree" && PYTHONPATH="$tree/src:/tmp/site" timeout 200 python3 "$PROBE" \
     "${ARGS[@]}" --out "/tmp/attn_layer_trees_json/$name.json") > /tmp/attn_layer_trees_one.log 2>&1 \
    || echo "$name: probe failed"
  sed "s/^/$name  /" /tmp/attn_layer_trees_one.log >> "$OUT/trees.log"
  if [ "$PROBE" = bench/profiling/attn_layer_probe.py ]; then
    grep -E "^($pat)_|rel. errors" /tmp/attn_layer_trees_one.log | sed "s/^/$name  /"
  else
    tail -12 /tmp/attn_layer_trees_one.log | sed "s/^/$name  /"
  fi
done
# one JSON of all trees ({tree: the probe's JSON}): the device returns at most 8 files
python3 - "$OUT/trees.json" /tmp/attn_layer_trees_json/*.json <<'PY'
import json, pathlib, sys
out = {pathlib.Path(f).stem: json.loads(pathlib.Path(f).read_text()) for f in sys.argv[2:]}
pathlib.Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
PY
