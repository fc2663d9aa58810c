#!/usr/bin/env bash
# LAMMPS + DeePMD-kit's plugin exploring the way DP-GEN does (one walker per LAMMPS run): fcc Cu
# 3x3x3 (108 atoms, a = 3.634), pair_style deepmd with the four models, deviation every 10 steps
# (out_freq 10 out_file model_devi.out), frames dumped every 10 steps, NPT (fix npt ... iso; DP-GEN's
# tau_t 0.1 ps, tau_p 0.5 ps), 300 K, 1 bar, 1 fs, `neighbor 1.0 bin` (DP-GEN's template).
# Adapted from ../shared/tools/lammps_bench.sh.
#
#   bench/lammps_explore.sh LABEL STEPS m0.pth m1.pth m2.pth m3.pth
#
# Env: LMP (the lmp binary), PLUGIN (libdeepmd_lmpplugin.so; default: the installed deepmd-kit's),
# NPROC (default 1: that many identical runs at once on the same GPU; throughput over all of them),
# REP (cells per side, default 3), OUT (logs copied there if set). The library path (deepmd/lib, torch,
# mpich, liblammps, libcudart.so.12) is the caller's: bench_explore_deepmd_gpu.sh sets it.
# Prints one JSON line: us_per_atom_step = LAMMPS loop time of the timed run / steps / atoms
# (NPROC > 1: wall time of the slowest run's loop / (steps x atoms x NPROC)).
set -u
LABEL=$1; STEPS=$2; shift 2; MODELS="$*"
LMP=${LMP:-lmp}; NPROC=${NPROC:-1}; REP=${REP:-3}
PLUGIN=${PLUGIN:-$(python3 -c "import deepmd, os; print(os.path.join(os.path.dirname(deepmd.__file__), 'lib', 'libdeepmd_lmpplugin.so'))")}
W=$(mktemp -d /tmp/lmpx_${LABEL}_XXXX); cd "$W"
i=0; ML=""  # linked as m0.pth m1.pth ... (the files may share a basename)
for m in $MODELS; do ln -sf "$(readlink -f "$m")" m$i.pth; ML="$ML m$i.pth"; i=$((i + 1)); done
cat > in.lmp <<EOT
plugin load $PLUGIN
units metal
boundary p p p
atom_style atomic
lattice fcc 3.634
region box block 0 $REP 0 $REP 0 $REP
create_box 1 box
create_atoms 1 box
mass 1 63.546
pair_style deepmd $ML out_freq 10 out_file model_devi.out
pair_coeff * *
thermo_style custom step temp pe ke etotal press vol lx ly lz xy xz yz
thermo 10
dump 1 all custom 10 traj.lammpstrj id type x y z fx fy fz
velocity all create 300 \${seed}
fix 1 all npt temp 300 300 0.1 iso 1 1 0.5
timestep 0.001
neighbor 1.0 bin
run 50
run $STEPS
EOT
T0=$(date +%s.%N)
for p in $(seq 1 $NPROC); do
  mkdir -p r$p; (cd r$p && ln -sf ../*.pth . 2>/dev/null; "$LMP" -in ../in.lmp -var seed $((12344 + p)) -log log.lammps > out 2>&1) &
done
wait
T1=$(date +%s.%N)
natoms=$(grep -m1 "Created [0-9]* atoms" r1/log.lammps | awk '{print $2}')
loops=$(for p in $(seq 1 $NPROC); do grep "Loop time" r$p/log.lammps | tail -1 | awk '{print $4}'; done | tr '\n' ' ')
[ -n "${OUT:-}" ] && [ "$NPROC" = 1 ] && cp r1/log.lammps "$OUT/lammps_${LABEL}.log" 2>/dev/null
python3 - "$LABEL" "$STEPS" "${natoms:-0}" "$NPROC" "$T0" "$T1" $loops <<'EOP'
import json, sys
label, steps, nat, nproc, t0, t1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
loops = [float(x) for x in sys.argv[7:]]
ok = len(loops) == nproc and nat > 0
r = {"case": label, "natoms": nat, "steps": steps, "nproc": nproc, "loop_s": loops, "wall_s_all_runs": t1 - t0,
     "us_per_atom_step": (max(loops) / steps / nat / nproc * 1e6) if ok else None}
print(json.dumps(r))
EOP
[ -n "$loops" ] || tail -30 r1/out
head -3 r1/model_devi.out 2>/dev/null
