#!/usr/bin/env bash
# Single-node SLURM cluster on this machine, for development and CI.
#
#   launchers/local-slurm.sh [start]   install (if missing), configure, start; wait for the node
#   launchers/local-slurm.sh status    one-line status; exit 0 if the node is usable
#   launchers/local-slurm.sh stop      stop slurmd, slurmctld and munged
#   launchers/local-slurm.sh restart   stop, then start
#
# Runs as root, needs no systemd (daemons are started directly), and is idempotent: running
# `start` again on a healthy cluster only checks it. Debian/Ubuntu (apt-get) only.
#
# Environment knobs (all optional):
#   LOCAL_SLURM_TIMEOUT=90     seconds to wait for the node to become usable
#   LOCAL_SLURM_PARTITION=debug
#   LOCAL_SLURM_CLUSTER=specsweep
#   LOCAL_SLURM_MEM_MB=...     RealMemory of the node (default: 90% of MemTotal)
#   LOCAL_SLURM_FORCE=1        overwrite an /etc/slurm/slurm.conf this script did not write
set -euo pipefail

PROG="local-slurm"
MARKER="# managed by specsweep launchers/local-slurm.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"

TIMEOUT="${LOCAL_SLURM_TIMEOUT:-90}"
PARTITION="${LOCAL_SLURM_PARTITION:-debug}"
CLUSTER="${LOCAL_SLURM_CLUSTER:-specsweep}"
NODE="$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)"
CPUS="$(nproc)"
if [[ -n "${LOCAL_SLURM_MEM_MB:-}" ]]; then
    MEM_MB="$LOCAL_SLURM_MEM_MB"
else
    MEM_MB="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
fi

log() { echo "$PROG: $*" >&2; }
die() { echo "$PROG: ERROR: $*" >&2; exit 1; }

alive() {  # alive PIDFILE -> 0 if the process in PIDFILE runs (zombies do not count)
    local pid state
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}
pid_of() { cat "$1" 2>/dev/null || true; }

need_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (it installs packages, writes /etc and starts daemons)"
}

# --------------------------------------------------------------------------- install
install_packages() {
    local missing=0 b
    for b in slurmctld slurmd sinfo sbatch scontrol munged munge unmunge; do
        command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || missing=1
    done
    [[ $missing == 0 ]] && return 0
    command -v apt-get >/dev/null || die "slurm/munge missing and no apt-get: install slurmctld, slurmd, slurm-client and munge yourself"
    log "installing slurm-wlm and munge with apt-get (one-off)"
    # Keep apt from starting services itself (no systemd in containers; we start the daemons).
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local pkgs=(slurm-wlm slurmctld slurmd slurm-client munge)
    local apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
                    --no-install-recommends)
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install "${apt_opts[@]}" "${pkgs[@]}" </dev/null >/tmp/local-slurm-apt.log 2>&1; then
        log "apt-get install failed with the current package lists; running apt-get update"
        apt-get update -q </dev/null >>/tmp/local-slurm-apt.log 2>&1 || true
        apt-get install "${apt_opts[@]}" "${pkgs[@]}" </dev/null >>/tmp/local-slurm-apt.log 2>&1 || {
            [[ $own_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
            tail -n 20 /tmp/local-slurm-apt.log >&2
            die "apt-get install ${pkgs[*]} failed (full log: /tmp/local-slurm-apt.log)"
        }
    fi
    [[ $own_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
    return 0
}

# --------------------------------------------------------------------------- munge
setup_munge() {
    getent passwd munge >/dev/null || die "user 'munge' missing (the munge package creates it)"
    install -d -o munge -g munge -m 0700 /etc/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating munge key $MUNGE_KEY"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then return 0; fi
    if alive "$MUNGE_PID"; then kill "$(pid_of "$MUNGE_PID")" 2>/dev/null || true; sleep 1; fi
    rm -f "$MUNGE_PID" "$MUNGE_RUN"/munge.socket.2*
    log "starting munged"
    # munged runs as root here (--force accepts the munge-owned key); it daemonises itself.
    munged --force >>/var/log/munge/munged.start.log 2>&1 \
        || die "munged failed to start; see /var/log/munge/munged.log and /var/log/munge/munged.start.log"
    local i
    for i in $(seq 1 50); do munge_ok && return 0; sleep 0.2; done
    die "munged started but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
}

# --------------------------------------------------------------------------- slurm.conf
render_conf() {
    cat <<EOF
$MARKER
# Single-node development/CI cluster. Regenerated on every start; edit the script, not this file.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# scheduling: CPUs are the consumable; memory is checked against RealMemory but not reserved,
# so jobs that do not ask for memory still run side by side.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# no accounting database
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# short timeouts: quick tests, quick recovery
MinJobAge=30
KillWait=5
Waittime=0
InactiveLimit=0
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
SchedulerParameters=sched_interval=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

# Writes slurm.conf; returns 0 if it changed (or was new), 1 if unchanged.
write_conf() {
    install -d -m 0755 "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$CTLD_STATE" "$SLURMD_SPOOL"
    if [[ -e "$CONF" ]] && ! grep -qxF "$MARKER" "$CONF" && [[ "${LOCAL_SLURM_FORCE:-0}" != 1 ]]; then
        die "$CONF exists and was not written by this script; refusing to overwrite (LOCAL_SLURM_FORCE=1 to override)"
    fi
    local tmp
    tmp="$(mktemp)"
    render_conf > "$tmp"
    if [[ -e "$CONF" ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1
    fi
    [[ -e "$CONF" ]] && log "slurm.conf changed; rewriting $CONF"
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    return 0
}

# --------------------------------------------------------------------------- daemons
node_state() { { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null || true; } | head -n1; }

stop_slurm() {
    local f
    if alive "$CTLD_PID" || alive "$SLURMD_PID"; then
        log "stopping slurmd and slurmctld"
    fi
    for f in "$SLURMD_PID" "$CTLD_PID"; do
        alive "$f" && kill "$(pid_of "$f")" 2>/dev/null || true
    done
    local i
    for i in $(seq 1 50); do
        alive "$SLURMD_PID" || alive "$CTLD_PID" || break
        sleep 0.2
    done
    for f in "$SLURMD_PID" "$CTLD_PID"; do
        alive "$f" && kill -9 "$(pid_of "$f")" 2>/dev/null || true
        rm -f "$f"
    done
}

stop_munge() {
    if alive "$MUNGE_PID"; then
        log "stopping munged"
        kill "$(pid_of "$MUNGE_PID")" 2>/dev/null || true
        local i
        for i in $(seq 1 25); do alive "$MUNGE_PID" || break; sleep 0.2; done
    fi
}

start_slurm() {
    if ! alive "$CTLD_PID"; then
        log "starting slurmctld"
        slurmctld -f "$CONF" || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
    fi
    local i
    for i in $(seq 1 50); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
    if ! alive "$SLURMD_PID"; then
        log "starting slurmd"
        slurmd -f "$CONF" || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
    fi
}

wait_usable() {
    local start=$SECONDS st="" resumed=0
    while (( SECONDS - start < TIMEOUT )); do
        st="$(node_state)"
        case "$st" in
            idle|mixed|allocated|completing) return 0 ;;
            drained|draining|down|drained\*|down\*)
                if [[ $resumed == 0 ]] && alive "$SLURMD_PID"; then
                    # left over from a previous run (e.g. slurmd was stopped): put it back
                    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 1
    done
    {
        echo "$PROG: ERROR: node $NODE not usable after ${TIMEOUT}s (state: '${st:-no answer from slurmctld}')"
        sinfo -N -l 2>&1 | sed 's/^/    /' || true
        scontrol show node "$NODE" 2>/dev/null | grep -i reason | sed 's/^/    /' || true
        echo "  last lines of $LOG_DIR/slurmctld.log:"; tail -n 8 "$LOG_DIR/slurmctld.log" 2>/dev/null | sed 's/^/    /'
        echo "  last lines of $LOG_DIR/slurmd.log:"; tail -n 8 "$LOG_DIR/slurmd.log" 2>/dev/null | sed 's/^/    /'
    } >&2
    exit 1
}

status_line() {
    local st
    if ! alive "$CTLD_PID"; then
        echo "$PROG: down (slurmctld not running)"
        return 1
    fi
    st="$(node_state)"
    if [[ -z "$st" ]]; then
        echo "$PROG: down (no answer from slurmctld)"
        return 1
    fi
    echo "$PROG: up - cluster $CLUSTER, node $NODE ($CPUS CPUs, ${MEM_MB} MB) $st, partition $PARTITION, conf $CONF"
    case "$st" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

# --------------------------------------------------------------------------- commands
cmd_start() {
    need_root
    local t0
    t0="$(date +%s%N)"
    export PATH="$PATH:/usr/sbin:/sbin"
    install_packages
    setup_munge
    start_munge
    if write_conf; then
        # new or changed configuration: (re)start the slurm daemons to pick it up
        stop_slurm
    fi
    start_slurm
    wait_usable
    status_line
    log "ready in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
}

cmd_stop() {
    need_root
    export PATH="$PATH:/usr/sbin:/sbin"
    stop_slurm
    stop_munge
    echo "$PROG: stopped"
}

case "${1:-start}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) export PATH="$PATH:/usr/sbin:/sbin"; status_line ;;
    -h|--help|help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$1' (start|stop|restart|status)" ;;
esac
