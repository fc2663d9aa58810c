#!/usr/bin/env bash
# The README's test command: install what the tests need on a fresh Debian machine, then run pytest.
#   bash tests/run.sh [pytest args]
# Debian packages: real DFT codes (Quantum ESPRESSO, CP2K), a real single-node SLURM, headless Chromium.
# Python: this package with its test extras (DeePMD-kit on CPU, dpdata, ASE, Snakemake + SLURM plugin).
set -euo pipefail
cd "$(dirname "$0")/.."
DEBS="quantum-espresso quantum-espresso-data cp2k cp2k-data slurmctld slurmd slurm-client munge chromium"
# all of them installed already (a machine that ran this before): no index update, no install (~15 s)
installed() { dpkg-query -W -f='${Status}\n' $DEBS 2>/dev/null | grep -c "install ok installed" || true; }
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ -z "${DPSNAKE_SKIP_APT:-}" ] &&
  [ "$(installed)" != "$(echo $DEBS | wc -w)" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $DEBS >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
# style first (seconds): ruff lint + format and snakefmt, as configured in pyproject.toml; one command
# each, so that set -e stops here (in an && list only the last command's failure would)
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m snakefmt --check Snakefile workflow
python3 -m pytest "$@"
