#!/usr/bin/env bash
# A single-node SLURM cluster on this Debian machine, for tests: Debian's slurm-wlm and munge,
# slurmctld and slurmd started without systemd, one node with this machine's CPUs and memory and
# two GPUs declared through gres (placeholder character devices), so GPU jobs are scheduled and
# receive CUDA_VISIBLE_DEVICES. Partitions: cpu (default) and gpu, both this node.
#
#   sudo scripts/slurm_cluster.sh up      install (apt) if needed, configure, start, wait until idle
#   sudo scripts/slurm_cluster.sh down    stop the daemons this script started (by their pid files)
#   scripts/slurm_cluster.sh status
#
# Needs root (apt, /etc/slurm, mknod). State lives in $SLURM_STATE (default /var/lib/modelmake-slurm).
set -euo pipefail
STATE=${SLURM_STATE:-/var/lib/modelmake-slurm}
HOST=$(hostname -s)

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
  fi
}

configure() {
  mkdir -p "$STATE"/{spool,ctld,log} /etc/slurm /run/munge /var/log/munge /var/lib/munge
  for i in 0 1; do  # gres needs character devices; /dev/null's numbers, harmless
    [ -c /dev/fakegpu$i ] || mknod -m 666 /dev/fakegpu$i c 1 3
  done
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=modelmake
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=$HOST CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
  echo "Name=gpu File=/dev/fakegpu[0-1]" > /etc/slurm/gres.conf
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  install
  configure
  alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  alive "$STATE/slurmctld.pid" || slurmctld
  alive "$STATE/slurmd.pid" || slurmd
  for _ in $(seq 1 60); do
    if sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
      sinfo
      return 0
    fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm_cluster: the node did not become idle; see $STATE/log/" >&2
  sinfo -R >&2 || true
  return 1
}

down() {
  for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    if alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$pidfile"
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
