#!/usr/bin/env bash
# A real single-node SLURM on this machine, for tests/test_launch_slurm.py and CI.
#
#   sudo bash launch/slurm_setup.sh      # installs slurm-wlm + munge if needed, configures, starts, waits
#
# Idempotent: a second run finds the daemons up with the same slurm.conf and returns in about a second.
# Works without systemd (containers, VMs): munged, slurmctld and slurmd are started as plain daemons.
# Settings (environment):
#   SLURM_SETUP_PARTITION  partition name (default: debug)
#   SLURM_SETUP_CPUS       CPUs of the node (default: nproc)
#   SLURM_SETUP_TIMEOUT    seconds to wait for the node to become idle (default: 60)
# Not for production clusters: no accounting, no cgroups, daemons run as root, requeue delay 10 s.
set -euo pipefail

PARTITION=${SLURM_SETUP_PARTITION:-debug}
TIMEOUT=${SLURM_SETUP_TIMEOUT:-60}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid

die() {
    echo "slurm_setup: error: $*" >&2
    for log in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [ -s "$log" ]; then
            echo "--- last lines of $log ---" >&2
            tail -n 15 "$log" >&2
        fi
    done
    exit 1
}
say() { echo "slurm_setup: $*"; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons); try: sudo bash $0"

# --- packages ---------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and apt-get is not available; install them yourself"
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
fi

HOST=$(hostname -s)
[ -n "$HOST" ] || die "hostname -s is empty"
if ! getent hosts "$HOST" >/dev/null; then
    say "adding $HOST to /etc/hosts"
    echo "127.0.0.1 $HOST" >> /etc/hosts
fi

# --- munge ------------------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    say "starting munged"
    rm -f /run/munge/munge.socket.2.lock 2>/dev/null || true
    if command -v runuser >/dev/null; then
        runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    else
        su -s /bin/sh munge -c /usr/sbin/munged || die "munged did not start"
    fi
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged is running but munge -n | unmunge fails"
fi

# --- slurm.conf -------------------------------------------------------------------------------------
CPUS=${SLURM_SETUP_CPUS:-$(nproc)}
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
REAL_MEM=$(( MEM_MB * 9 / 10 ))  # a bit below the machine's, so slurmd never reports less than configured
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"

NEW_CONF=$(cat <<EOF
# Written by launch/slurm_setup.sh: a single-node test cluster on $HOST. Rerun the script to regenerate.
ClusterName=pretrain-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire + 1 seconds before they may start again (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
MinJobAge=600
Waittime=0
# No accounting.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)

# alive PIDFILE: the pid in it runs the daemon the file is named after (not some later process with a reused pid)
alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ]
}
stop_daemon() {  # pidfile
    if alive "$1"; then
        local pid; pid=$(cat "$1")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$1"
}

CHANGED=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    say "writing $CONF (node $HOST, CPUs=$CPUS, RealMemory=$REAL_MEM, partition $PARTITION)"
    printf '%s\n' "$NEW_CONF" > "$CONF"
    CHANGED=1
fi
# Without cgroup plugins slurmd does not need cgroup.conf, but an empty one silences its lookup.
[ -f "$CONF_DIR/cgroup.conf" ] || echo "# unused: proctrack/linuxproc, task/none" > "$CONF_DIR/cgroup.conf"

if [ "$CHANGED" -eq 1 ]; then
    stop_daemon "$SLURMD_PID"
    stop_daemon "$CTLD_PID"
fi

# --- daemons ----------------------------------------------------------------------------------------
if ! alive "$CTLD_PID"; then
    say "starting slurmctld"
    slurmctld || die "slurmctld did not start"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer scontrol ping"
if ! alive "$SLURMD_PID"; then
    say "starting slurmd"
    slurmd || die "slurmd did not start"
fi

state() { sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }
resumed=0
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
    s=$(state)
    case "$s" in
        idle | mix | alloc | comp) break ;;
        down | drain | drng | fail | failg)
            if [ "$resumed" -eq 0 ]; then
                say "node $HOST is $s; resuming it"
                scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
                resumed=1
            fi ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || die "node $HOST is '${s:-unknown}' after ${TIMEOUT}s, not idle (see sinfo -R)"
    sleep 0.5
done
say "ready: node $HOST is $s in partition $PARTITION ($(sinfo -V))"
