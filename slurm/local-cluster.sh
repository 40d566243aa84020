#!/usr/bin/env bash
# A real Slurm on one host, for Shardforge's tests and for trying the batch flow on a laptop or CI box.
#
#   slurm/local-cluster.sh up       install (Debian/Ubuntu, as root) and start munge, slurmctld and one slurmd
#                                   per emulated node; waits until every node is idle
#   slurm/local-cluster.sh down     cancel jobs, stop the daemons, remove the state
#   slurm/local-cluster.sh status   sinfo + squeue
#   slurm/local-cluster.sh env      print `export SLURM_CONF=...` for your shell
#
# Settings (environment): SHARDFORGE_SLURM_DIR (/tmp/shardforge-slurm), SHARDFORGE_SLURM_NODES (2),
# SHARDFORGE_SLURM_CPUS (CPUs each node claims; default: this host's count; may exceed it).
# Several slurmd on one host emulate several nodes: each has its own name (nodeN, added to /etc/hosts as
# 127.0.0.1), port and spool folder. No systemd and no cgroups are needed.
set -euo pipefail

DIR=${SHARDFORGE_SLURM_DIR:-/tmp/shardforge-slurm}
NODES=${SHARDFORGE_SLURM_NODES:-2}
CPUS=${SHARDFORGE_SLURM_CPUS:-$(nproc)}
CTLD_PORT=${SHARDFORGE_SLURM_PORT:-16917}
export SLURM_CONF=$DIR/slurm.conf
TAG='# shardforge-local-slurm'

node_names() { local i; for i in $(seq 1 "$NODES"); do echo "node$i"; done; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  if [ "$(id -u)" != 0 ]; then echo "error: Slurm is not installed and this is not root; install slurmctld slurmd slurm-client munge" >&2; exit 2; fi
  echo "installing slurmctld slurmd slurm-client munge (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

hosts_entries() {   # rewrite /etc/hosts in place (it may be a bind mount): drop ours, add the node names
  local keep; keep=$(grep -v "$TAG\$" /etc/hosts || true)
  { echo "$keep"; [ "${1:-}" = add ] && echo "127.0.0.1 $(node_names | tr '\n' ' ')$TAG"; } > /etc/hosts
}

write_conf() {
  local mem; mem=$(( $(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo) / NODES ))
  cat <<CONF
ClusterName=shardforge
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/state/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName=node[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 100))-$((CTLD_PORT + 99 + NODES)) CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

up() {
  install_packages
  mkdir -p "$DIR"/log "$DIR"/run "$DIR"/munge
  chown munge:munge "$DIR"/munge && chmod 711 "$DIR"/munge
  write_conf > "$DIR/slurm.conf.new"
  if ! cmp -s "$DIR/slurm.conf.new" "$SLURM_CONF"; then stop_daemons; rm -rf "$DIR/state"; fi
  mv "$DIR/slurm.conf.new" "$SLURM_CONF"
  mkdir -p "$DIR/state/ctld"
  hosts_entries add
  if ! running "$DIR/munge/munged.pid"; then
    [ -s "$DIR/munge/munge.key" ] || runuser -u munge -- mungekey --create --keyfile="$DIR/munge/munge.key"
    runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
  fi
  running "$DIR/run/slurmctld.pid" || slurmctld
  local n
  for n in $(node_names); do running "$DIR/run/slurmd-$n.pid" || slurmd -N "$n"; done
  for _ in $(seq 300); do
    if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle$')" = "$NODES" ]; then
      sinfo -N; echo "export SLURM_CONF=$SLURM_CONF"; return 0
    fi
    sleep 0.2
  done
  echo "error: the local Slurm did not become idle within 60 s; logs in $DIR/log" >&2
  sinfo -N -l >&2 || true; tail -n 20 "$DIR"/log/*.log >&2 || true; return 1
}

stop_daemons() {
  if running "$DIR/run/slurmctld.pid"; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  local f pids=""
  for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
    running "$f" && pids+=" $(cat "$f")"
  done
  [ -n "$pids" ] || return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 100); do
    local alive=""; for p in $pids; do kill -0 "$p" 2>/dev/null && alive+=" $p"; done
    [ -z "$alive" ] && return 0; sleep 0.1
  done
  kill -9 $pids 2>/dev/null || true
}

case "${1:-up}" in
  up) up ;;
  down) stop_daemons; rm -rf "$DIR/state" "$DIR/run"; hosts_entries ;;
  status) sinfo -N -l; squeue ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
