#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying `launcher: {kind: slurm}` and for the tests.
#
#   tools/slurm-local.sh up     install slurm-wlm + munge when missing (needs root), write slurm.conf
#                               for this machine at Slurm's default path, start munged, slurmctld and
#                               slurmd, wait until the node is idle            (= make slurm-up)
#   tools/slurm-local.sh down   stop exactly the daemons `up` started (their pid files)  (= make slurm-down)
#   tools/slurm-local.sh status
#
# Both are idempotent: `up` starts only what is not running, `down` stops only what `up` started.
# A slurm.conf that this script did not write is never overwritten.
set -euo pipefail

STATE=${SPACH_SLURM_STATE:-/var/lib/spach-slurm}      # our pid files, logs and spool
MARK="# written by spach tools/slurm-local.sh"
PARTITION=${SPACH_SLURM_PARTITION:-debug}

say() { echo "slurm-local: $*"; }
die() { echo "slurm-local: error: $*" >&2; exit 1; }

conf_dir() {
    # where this Slurm build reads slurm.conf: Debian's 22.05 uses /etc/slurm, older ones /etc/slurm-llnl
    local lib d
    lib=$(ldd "$(command -v slurmctld)" 2>/dev/null | awk '/libslurm/ {print $3; exit}')
    d=$(grep -aoE '/etc/slurm(-llnl)?' "${lib:-/dev/null}" "$(command -v slurmctld)" 2>/dev/null | head -1 | cut -d: -f2)
    echo "${d:-/etc/slurm}"
}

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and this is not root; install them " \
                              "(apt-get install slurm-wlm munge) or run as root"
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

alive() {  # alive PIDFILE: the process of the pid file runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    local dir conf host cpus mem
    dir=$(conf_dir)
    conf="$dir/slurm.conf"
    if [ -f "$conf" ] && ! head -1 "$conf" | grep -qF "$MARK"; then
        say "keeping $conf (not written by this script)"
        return
    fi
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))   # MB, 10% for the system
    mkdir -p "$dir" "$STATE/ctld" "$STATE/d"
    cat > "$conf.tmp" <<EOF
$MARK; remove this line to keep your edits
ClusterName=spach-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=30
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    if cmp -s "$conf.tmp" "$conf"; then
        rm -f "$conf.tmp"
    else
        mv "$conf.tmp" "$conf"
        say "wrote $conf ($host: $cpus CPUs, ${mem} MB)"
        if alive "$STATE/slurmctld.pid"; then scontrol reconfigure || true; fi
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return   # a munged already answers (ours or the system's)
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    say "starting munged"
    if id munge >/dev/null 2>&1; then
        su -s /bin/sh munge -c "munged --pid-file=/run/munge/munged.pid"
    else
        munged --force --pid-file=/run/munge/munged.pid
    fi
    cp /run/munge/munged.pid "$STATE/munged.pid"
}

start_daemon() {  # start_daemon NAME
    local name=$1
    if alive "$STATE/$name.pid"; then
        return
    fi
    say "starting $name"
    "$name"   # both daemonize and write their pid file (see slurm.conf)
    for _ in $(seq 50); do alive "$STATE/$name.pid" && return; sleep 0.2; done
    die "$name did not start; see $STATE/$name.log"
}

wait_idle() {
    local host state
    host=$(hostname -s)
    for _ in $(seq 120); do
        state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mixed|allocated) say "node $host is $state (partition $PARTITION)"; return ;;
            down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $host did not become idle (state: ${state:-unknown}); see $STATE/slurmctld.log"
}

up() {
    install_if_missing
    if [ "$(id -u)" != 0 ]; then
        sinfo -h >/dev/null 2>&1 && { wait_idle; return; }
        die "no Slurm cluster answers, and starting munged, slurmctld and slurmd needs root"
    fi
    mkdir -p "$STATE"
    write_conf
    start_munge
    start_daemon slurmctld
    start_daemon slurmd
    wait_idle
}

down() {
    local name
    for name in slurmd slurmctld munged; do
        if alive "$STATE/$name.pid"; then
            say "stopping $name (pid $(cat "$STATE/$name.pid"))"
            kill "$(cat "$STATE/$name.pid")"
            for _ in $(seq 50); do alive "$STATE/$name.pid" || break; sleep 0.2; done
        fi
        rm -f "$STATE/$name.pid"
    done
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive "$STATE/$name.pid"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"
        else echo "$name: not started by slurm-local"; fi
    done
    command -v sinfo >/dev/null && sinfo 2>/dev/null || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: $0 up|down|status" ;;
esac
