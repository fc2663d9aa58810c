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
sed -i 's/CIBUILDWHEEL = 1/CIBUILDWHEEL = 0/' /tmp/site/deepmd/lib/run_config.ini
# bytecode, as `pip install` (without --target's --no-compile) leaves it on a user's machine: the image
# sets PYTHONDONTWRITEBYTECODE=1, so without this every process of the demo compiles each module it imports
python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1; }
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
