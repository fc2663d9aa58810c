# Sourced (bash) on the GPU machine: installs the wheels carried in $REPO/.whl and $REPO/.whl2 into
# /tmp/site (once per machine) and sets LD_PRELOAD (mpich), PYTHONPATH and PATH (dpsnake, snakemake, dp
# console scripts) for the calling shell. bench/demo_gpu.sh's header says how the wheel folders are made.
# Needs REPO (the repository root).
[ -f /tmp/site/deepmd/lib/run_config.ini ] || {
python3 -m pip install -q --no-index --no-deps --no-cache-dir "$REPO"/.whl/mpich*.whl >/dev/null 2>&1 \
  || echo "mpich install failed"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls "$REPO"/.whl/*.whl "$REPO"/.whl2/*.whl | grep -v -e mpich -e nvidia_cuda_runtime) >/dev/null 2>&1 \
  || { echo "wheel install failed"; return 1; }
sed -i 's/CIBUILDWHEEL = 1/CIBUILDWHEEL = 0/' /tmp/site/deepmd/lib/run_config.ini; }
# bytecode, as `pip install` leaves it on a user's machine: the image has none for its torch and numpy and
# sets PYTHONDONTWRITEBYTECODE=1, and `pip --target --no-compile` wrote none, so every process of the demo
# compiled each module it imports (the training server's import: 17 s). Compiled once per machine into a
# separate tree (PYTHONPYCACHEPREFIX: the image's folders stay as they are); processes add what is missing.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
[ -f /tmp/pycache/.done ] || {
T_PYC=$(date +%s)
python3 -m compileall -q -j 0 $(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") /tmp/site \
  >/dev/null 2>&1
echo "bytecode of the image's site-packages and the wheels: $(( $(date +%s) - T_PYC )) s,"\
  "$(find /tmp/pycache -name '*.pyc' | wc -l) files"
touch /tmp/pycache/.done; }
python3 -m compileall -q -j 0 "$REPO/src" >/dev/null 2>&1
MPILIB=$(python3 -c "import importlib.metadata as m; print([str(p.locate()) for p in m.files('mpich') if str(p).endswith('libmpi.so.12')][0])")
export LD_PRELOAD=$MPILIB PYTHONPATH=$REPO/src:/tmp/site
# console scripts the rules call (`pip --target` makes none that point at this python)
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -c "import sys; from dpsnake.cli import main; sys.exit(main())" "$@"\n' > /tmp/bin/dpsnake
printf '#!/bin/sh\nexec python3 -m snakemake "$@"\n' > /tmp/bin/snakemake
printf '#!/bin/sh\nexec python3 -m deepmd "$@"\n' > /tmp/bin/dp
chmod +x /tmp/bin/*
export PATH=/tmp/bin:$PATH
