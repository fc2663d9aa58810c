#!/usr/bin/env bash
# A real single-node SLURM on localhost, for testing `snakemake --profile profiles/slurm` (CI, laptops).
#
#   sudo bash scripts/slurm-local.sh start    # munged + slurmctld + slurmd, waits until the node is idle
#   sudo bash scripts/slurm-local.sh status   # daemons, sinfo, squeue
#   sudo bash scripts/slurm-local.sh stop     # stops only the daemons this script started (pid files)
#
# Needs root and Debian's packages: apt-get install -y slurmctld slurmd slurm-client munge
#
# What it sets up (Debian 12, SLURM 22.05):
# - munge key (created if missing) and munged, unless a munged already answers;
# - /etc/slurm/slurm.conf (+ gres.conf) for one node "localhost" with this machine's CPUs and ~80% of its
#   memory, one default partition "debug", select/cons_tres with CR_Core_Memory (so --mem and
#   --cpus-per-task are enforced by the scheduler), no cgroups (proctrack/linuxproc, task/none: works in
#   containers);
# - GPUs advertised as GRES backed by character devices (File=/dev/null ...): GPU requests
#   (--gres=gpu:1 or --gpus=1) are scheduled on a GPU-less node and jobs get CUDA_VISIBLE_DEVICES.
#   A count-only GRES line (no File=) is silently dropped by slurmd, hence the files;
# - no accounting daemon (no slurmdbd/MariaDB): the Snakemake SLURM plugin must use
#   `--slurm-status-command squeue`. That is reliable only while finished jobs stay visible to squeue:
#   MinJobAge (3600 s here) must be >= 3 x the plugin's `slurm-init-seconds-before-status-checks`,
#   otherwise the plugin falls back to sacct, which fails without slurmdbd and Snakemake waits forever.
#
# It refuses to touch a slurm.conf it did not write or a slurmctld/slurmd it did not start.
# Settings (environment): DPSNAKE_SLURM_DIR (state, logs, pid files; default /tmp/dpsnake-slurm),
# DPSNAKE_SLURM_GPUS (advertised GPUs, 0..4, default 2), DPSNAKE_SLURM_MEM_PERCENT (default 80).
set -euo pipefail

STATE=${DPSNAKE_SLURM_DIR:-/tmp/dpsnake-slurm}
NGPU=${DPSNAKE_SLURM_GPUS:-2}
MEM_PERCENT=${DPSNAKE_SLURM_MEM_PERCENT:-80}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by dpsnake scripts/slurm-local.sh"
GPU_FILES=(/dev/null /dev/zero /dev/full /dev/urandom)

say() { echo "slurm-local: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root_and_packages() {
  [ "$(id -u)" = 0 ] || die "must run as root (daemons, /etc/slurm, /etc/munge)"
  local missing=()
  for b in munged slurmctld slurmd sbatch squeue sinfo scontrol; do
    command -v "$b" >/dev/null || missing+=("$b")
  done
  [ ${#missing[@]} = 0 ] || die "missing ${missing[*]}: apt-get install -y slurmctld slurmd slurm-client munge"
}

# pid of a daemon we started, if it is still that daemon (pid files can outlive their process)
our_pid() {
  local name=$1 f=$STATE/$1.pid pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
  echo "$pid"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then say "munged already running (not ours, left alone)"; return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  fi
  mkdir -p /run/munge /var/lib/munge "$STATE/munge"
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge "$STATE/munge"
  chmod 700 /etc/munge; chmod 600 /etc/munge/munge.key; chmod 755 /run/munge
  # munged daemonises and writes its own pid file; run it as the munge user it expects
  runuser -u munge -- munged --pid-file="$STATE/munge/munged.pid" \
    --log-file="$STATE/munge/munged.log" --seed-file=/var/lib/munge/munged.seed
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged did not start: see $STATE/munge/munged.log"
  cp "$STATE/munge/munged.pid" "$STATE/munged.pid"
}

write_conf() {
  if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: refusing to replace a real SLURM configuration"
  fi
  local cpus mem_mb gres_line="" gres_node="" i
  cpus=$(nproc)
  mem_mb=$(awk -v p="$MEM_PERCENT" '/^MemTotal:/ {printf "%d", $2 / 1024 * p / 100}' /proc/meminfo)
  [[ $NGPU =~ ^[0-4]$ ]] || die "DPSNAKE_SLURM_GPUS must be 0..4, got '$NGPU'"
  if [ "$NGPU" -gt 0 ]; then gres_node=" Gres=gpu:$NGPU"; fi
  mkdir -p "$CONF_DIR" "$STATE"/{spool/ctld,spool/d,log}
  cat >"$CONF.tmp" <<EOF
$MARK: a single-node test cluster on localhost
ClusterName=dpsnake-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: works in containers; the scheduler still enforces CPUs, memory and GRES at allocation
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# refuse jobs no node/partition can ever run (e.g. a group wider than the node) instead of pending forever
EnforcePartLimits=ALL
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
# finished jobs stay visible to squeue for an hour: the Snakemake plugin's squeue status needs
# MinJobAge >= 3 x slurm-init-seconds-before-status-checks (40 s by default)
MinJobAge=3600
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
MessageTimeout=30
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb$gres_node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  {
    echo "$MARK"
    for ((i = 0; i < NGPU; i++)); do echo "NodeName=localhost Name=gpu File=${GPU_FILES[$i]}"; done
  } >"$CONF_DIR/gres.conf.tmp"
  mv "$CONF.tmp" "$CONF"
  mv "$CONF_DIR/gres.conf.tmp" "$CONF_DIR/gres.conf"
  say "wrote $CONF: CPUs=$cpus RealMemory=${mem_mb}MB GPUs(GRES)=$NGPU partition=debug"
}

wait_idle() {
  local state=""
  for _ in $(seq 120); do
    state=$(sinfo -h -n localhost -o %t 2>/dev/null | head -1 || true)
    case "$state" in
      idle|mix|alloc) say "node localhost is $state"; return 0 ;;
      down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node did not become idle (state '$state'): see $STATE/log/slurmctld.log and slurmd.log"
}

start() {
  need_root_and_packages
  mkdir -p "$STATE/log"
  if our_pid slurmctld >/dev/null && our_pid slurmd >/dev/null; then
    say "already running (pids $(our_pid slurmctld) $(our_pid slurmd))"; wait_idle; return
  fi
  for d in slurmctld slurmd; do
    if ! our_pid "$d" >/dev/null && pgrep -x "$d" >/dev/null; then
      die "a $d not started by this script is running (pid $(pgrep -x "$d" | head -1)): stop it first"
    fi
  done
  write_conf
  start_munge
  # -c: clear any saved state (a fresh cluster, job ids from 1); both daemons write their pid files
  our_pid slurmctld >/dev/null || slurmctld -c
  our_pid slurmd >/dev/null || slurmd -N localhost
  for _ in $(seq 50); do our_pid slurmctld >/dev/null && our_pid slurmd >/dev/null && break; sleep 0.1; done
  our_pid slurmctld >/dev/null || die "slurmctld did not start: see $STATE/log/slurmctld.log"
  our_pid slurmd >/dev/null || die "slurmd did not start: see $STATE/log/slurmd.log"
  wait_idle
}

stop_one() {
  local name=$1 pid
  if pid=$(our_pid "$name"); then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    say "stopped $name (pid $pid)"
  fi
  rm -f "$STATE/$name.pid"
}

stop() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  # cancel what is left so no job outlives the cluster (only if our controller answers)
  if our_pid slurmctld >/dev/null; then scancel --quiet --full -u root 2>/dev/null || true; fi
  stop_one slurmd
  stop_one slurmctld
  stop_one munged
}

status() {
  for d in munged slurmctld slurmd; do
    if pid=$(our_pid "$d"); then echo "$d: running (pid $pid, started by this script)"
    elif pgrep -x "$d" >/dev/null; then echo "$d: running (not started by this script)"
    else echo "$d: not running"; fi
  done
  # without a controller sinfo/squeue retry for MessageTimeout (30 s) each: ask only ours
  if our_pid slurmctld >/dev/null; then sinfo || true; squeue || true; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
