#!/usr/bin/env bash
# A real SLURM on this machine, for tests/launch/test_launch_slurm.py, tests/launch/test_multinode.py and CI: one node, or the
# host's node plus N test nodes that are hosts of their own.
#
#   sudo bash launch/slurm_setup.sh              # one node (this host), partition debug
#   sudo bash launch/slurm_setup.sh --nodes 2    # also node1, node2 in partition multi (below)
#   sudo bash launch/slurm_setup.sh --down       # stop every daemon, remove the test nodes' namespaces
#
# It installs slurm-wlm + munge if needed, configures, starts and waits until every node is idle. Idempotent: a
# second run finds the daemons up with the same slurm.conf and returns in about a second. Works without systemd
# (containers, VMs): munged, slurmctld and the slurmds are started as plain daemons.
#
# --nodes N (N >= 2): node1..nodeN each run their own slurmd in their own network namespace (`ip netns`, named
# nl-node1...) with their own hostname (`unshare --uts`) and address SUBNET.11, .12, ... on a bridge (nl-br0,
# SUBNET.1, where slurmctld is reached); /etc/hosts names them. Jobs on them see two real hosts: distinct
# hostnames and addresses, a rendezvous that must use the first node's address (not localhost), and gloo that
# binds the interface of its hostname. Traffic stays on this machine. --nodes 1 removes them again.
# Settings (environment):
#   SLURM_SETUP_PARTITION  the host node's partition (default: debug); the test nodes' is `multi`
#   SLURM_SETUP_CPUS       CPUs of each node (default: nproc)
#   SLURM_SETUP_SUBNET     the test nodes' /24 (default: 10.213.7)
#   SLURM_SETUP_TIMEOUT    seconds to wait for the nodes to become idle (default: 60)
# Not for production clusters: no accounting, no cgroups, daemons run as root, requeue delay 10 s.
set -euo pipefail

PARTITION=${SLURM_SETUP_PARTITION:-debug}
MULTI_PARTITION=multi
TIMEOUT=${SLURM_SETUP_TIMEOUT:-60}
SUBNET=${SLURM_SETUP_SUBNET:-10.213.7}
BRIDGE=nl-br0
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
HOSTS_TAG="# slurm_setup test node"

NODES=1
DOWN=0
while [ $# -gt 0 ]; do
    case $1 in
        --nodes) NODES=${2:-}; shift 2 || { echo "slurm_setup: error: --nodes needs a number" >&2; exit 2; } ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        --down) DOWN=1; shift ;;
        *) echo "slurm_setup: error: unknown argument '$1'; usage: slurm_setup.sh [--nodes N] [--down]" >&2; exit 2 ;;
    esac
done
case $NODES in ''|*[!0-9]*) echo "slurm_setup: error: --nodes '$NODES' is not a number >= 1" >&2; exit 2 ;; esac
[ "$NODES" -ge 1 ] && [ "$NODES" -le 8 ] || { echo "slurm_setup: error: --nodes $NODES: use 1 to 8" >&2; exit 2; }
EXTRA=$(( NODES > 1 ? NODES : 0 ))  # test nodes besides the host's own

die() {
    echo "slurm_setup: error: $*" >&2
    for log in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-*.log /var/log/munge/munged.log; do
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

# --- helpers -----------------------------------------------------------------------------------------
# alive PIDFILE COMM: the pid in PIDFILE runs COMM (not some later process that reused the pid)
alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
stop_daemon() {  # PIDFILE COMM
    if alive "$1" "$2"; then
        local pid; pid=$(cat "$1")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$1"
}
slurmd_pid() { echo "/run/slurmd-$1.pid"; }
netns_of() { echo "nl-$1"; }
test_nodes() { local i; for i in $(seq 1 "$1"); do echo "node$i"; done; }
# Test nodes left from an earlier run with more of them: every nl-nodeK namespace there is.
existing_test_nodes() { ip netns list 2>/dev/null | sed -n 's/^nl-\(node[0-9]*\).*/\1/p'; }

remove_test_node() {  # NAME: its slurmd, namespace, host-side link and /etc/hosts line
    stop_daemon "$(slurmd_pid "$1")" slurmd
    ip netns del "$(netns_of "$1")" 2>/dev/null || true
    ip link del "nl-$1" 2>/dev/null || true
    sed -i "/ $1 $HOSTS_TAG\$/d" /etc/hosts
}

if [ "$DOWN" -eq 1 ]; then
    for node in $(existing_test_nodes); do remove_test_node "$node"; done
    ip link del "$BRIDGE" 2>/dev/null || true
    stop_daemon "$(slurmd_pid "$HOST")" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    say "down: slurmctld, the slurmds and the test nodes' namespaces are gone (munged is left running)"
    exit 0
fi

# --- test nodes: network namespace, address on the bridge, name in /etc/hosts -----------------------------
for node in $(existing_test_nodes); do
    if [ "${node#node}" -gt "$EXTRA" ]; then
        say "removing test node $node"
        remove_test_node "$node"
    fi
done
if [ "$EXTRA" -gt 0 ]; then
    command -v ip >/dev/null || die "--nodes needs iproute2's ip (apt-get install iproute2)"
    command -v unshare >/dev/null && command -v nsenter >/dev/null || die "--nodes needs util-linux's unshare and nsenter"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge || die "cannot create bridge $BRIDGE (needs root and a kernel with bridging)"
        ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    for node in $(test_nodes "$EXTRA"); do
        ns=$(netns_of "$node")
        addr="$SUBNET.$(( 10 + ${node#node} ))"
        if ! ip netns list | grep -q "^$ns\b"; then
            say "creating test node $node ($addr, network namespace $ns)"
            ip netns add "$ns"
            ip link add "nl-$node" type veth peer name eth0 netns "$ns"
            ip link set "nl-$node" master "$BRIDGE" up
            ip -n "$ns" addr add "$addr/24" dev eth0
            ip -n "$ns" link set eth0 up
            ip -n "$ns" link set lo up
        fi
        grep -q " $node $HOSTS_TAG\$" /etc/hosts || echo "$addr $node $HOSTS_TAG" >> /etc/hosts
    done
else
    ip link del "$BRIDGE" 2>/dev/null || true
fi

# --- slurm.conf -------------------------------------------------------------------------------------
CPUS=${SLURM_SETUP_CPUS:-$(nproc)}
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
REAL_MEM=$(( MEM_MB * 9 / 10 ))  # a bit below the machine's, so slurmd never reports less than configured
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"

NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN"
PARTITION_LINES="PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP"
CTLD_HOST=$HOST
if [ "$EXTRA" -gt 0 ]; then
    CTLD_HOST="$HOST($SUBNET.1)"  # the bridge's address: reached from the test nodes' namespaces too
    for node in $(test_nodes "$EXTRA"); do
        NODE_LINES="$NODE_LINES
NodeName=$node NodeHostname=$node NodeAddr=$SUBNET.$(( 10 + ${node#node} )) CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN"
    done
    PARTITION_LINES="$PARTITION_LINES
PartitionName=$MULTI_PARTITION Nodes=$(test_nodes "$EXTRA" | paste -sd,) MaxTime=INFINITE State=UP"
fi

NEW_CONF=$(cat <<EOF
# Written by launch/slurm_setup.sh: a test cluster on $HOST ($NODES node(s)). Rerun the script to regenerate.
ClusterName=pretrain-test
SlurmctldHost=$CTLD_HOST
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
# %n: each node's own spool, pid and log file (several slurmds share this machine's filesystem)
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
# a node that stops answering is marked down after this long, and the jobs on it end
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=600
Waittime=0
# No accounting.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$NODE_LINES
$PARTITION_LINES
EOF
)

ALL_NODES="$HOST $(test_nodes "$EXTRA" | tr '\n' ' ')"
CHANGED=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    say "writing $CONF (nodes: $ALL_NODES; CPUs=$CPUS, RealMemory=$REAL_MEM each)"
    printf '%s\n' "$NEW_CONF" > "$CONF"
    CHANGED=1
fi
# Without cgroup plugins slurmd does not need cgroup.conf, but an empty one silences its lookup.
[ -f "$CONF_DIR/cgroup.conf" ] || echo "# unused: proctrack/linuxproc, task/none" > "$CONF_DIR/cgroup.conf"

if [ "$CHANGED" -eq 1 ]; then
    for node in $ALL_NODES; do stop_daemon "$(slurmd_pid "$node")" slurmd; done
    stop_daemon /run/slurmd.pid slurmd  # the pid file of this script's earlier versions
    stop_daemon "$CTLD_PID" slurmctld
fi

# --- daemons ----------------------------------------------------------------------------------------
if ! alive "$CTLD_PID" slurmctld; then
    say "starting slurmctld"
    slurmctld || die "slurmctld did not start"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer scontrol ping"
for node in $ALL_NODES; do
    mkdir -p "$SPOOL_DIR/$node"
    alive "$(slurmd_pid "$node")" slurmd && continue
    say "starting slurmd for $node"
    if [ "$node" = "$HOST" ]; then
        slurmd -N "$node" || die "slurmd for $node did not start"
    else
        # its own network stack and hostname; the daemon (and every job step it forks) stays in both. nsenter,
        # not `ip netns exec`, which would remount /sys and hide the cgroup filesystem slurmd looks for.
        nsenter --net="/run/netns/$(netns_of "$node")" unshare --uts sh -c "hostname $node && exec slurmd -N $node" \
            || die "slurmd for $node did not start"
    fi
done

state() { sinfo -h -N -n "$1" -o %t 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }
deadline=$(( $(date +%s) + TIMEOUT ))
for node in $ALL_NODES; do
    resumed=0
    while :; do
        s=$(state "$node")
        case "$s" in
            idle | mix | alloc | comp) break ;;
            down | drain | drng | fail | failg)
                if [ "$resumed" -eq 0 ]; then
                    say "node $node is $s; resuming it"
                    scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
                    resumed=1
                fi ;;
        esac
        [ "$(date +%s)" -lt "$deadline" ] || die "node $node is '${s:-unknown}' after ${TIMEOUT}s, not idle (see sinfo -R)"
        sleep 0.5
    done
done
say "ready: $(sinfo -h -N -o '%N %P %t' | tr '\n' ';' | sed 's/;$//') ($(sinfo -V))"
