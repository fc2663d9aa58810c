#!/usr/bin/env bash
# Session 40's device call (docs/benchmarks.md "Session 40"), from a checkout of s40-combo (main since): the strip net
# probe in trees of main (b5b70ef) and s39-strip, then in the checkout the options that won switched on (PAIR, on in
# the code since; strip_tc + DIRECT) and tests + ab (with layer_tab, compressed) + explore (nets, LAMMPS, compressed).
# Make the trees first:
#   for r in main s39-strip; do rm -rf build/t_$r; mkdir -p build/t_$r && git archive $r src bench/profiling \
#     bench/benchutil.py | tar -x -C build/t_$r; done
# run: bash bench/profiling/strip_net_ab.sh   (carry .whl build/t_main build/t_s39-strip; ~6.5 min with the install)
export REPO=$(pwd); OUT0=$OUT
OUT=$OUT0/trees PROBE=bench/profiling/strip_net_probe.py bash bench/profiling/attn_layer_trees.sh build/t_main build/t_s39-strip
source bench/gpu_install.sh >/dev/null 2>&1
python3 - $OUT0/trees/trees.json <<'PY'
import json, sys, pathlib
r = json.load(open(sys.argv[1]))["t_s39-strip"]; t = lambda k: r[k + "_fwd_ms"] + r[k + "_bwd_ms"]
def sub(f, a, b):
    p = pathlib.Path(f); s = p.read_text()
    if a in s: p.write_text(s.replace(a, b)); print("set", b.strip())
    else: assert b in s, (f, a); print("already", b.strip())
if r["fma_pair_fwd_ms"] < 0.97 * r["fma_fwd_ms"]:
    sub("src/dpsnake/engine/cuda/strip_net.py", "\nPAIR = False", "\nPAIR = True")
fma = r["fma_bwd_ms"] + min(r["fma_fwd_ms"], r["fma_pair_fwd_ms"])
tc = min(("tc_direct", "tc_minb3", "tc_direct_ch4"), key=t)
print(f"fma {fma:.3f} ms, {tc} {t(tc):.3f} ms")
if t(tc) < 0.92 * fma:
    sub("src/dpsnake/engine/settings.py", "strip_tc: bool = False", "strip_tc: bool = True")
    if tc != "tc_minb3":
        sub("src/dpsnake/engine/cuda/strip_net_tc.py", "\nDIRECT = False", "\nDIRECT = True")
    if tc == "tc_direct_ch4":
        sub("src/dpsnake/engine/cuda/strip_net_tc.py", "\nFWD_CH = 2", "\nFWD_CH = 4")
PY
git diff --stat 2>/dev/null
echo "after trees: $SECONDS s"; OUT=$OUT0/g AB_MORE="layer_tab" XBUDGET=260 \
  XPLAN="builtin:se_atten_v2:tf32layer lammps:se_atten_v2:1 builtin:se_atten_v2_c:tf32layer" \
  bash bench/profiling/attn_layer_gpu.sh tests ab explore
source "$REPO/bench/profiling/pack_out.sh" && pack_out "$OUT0"
