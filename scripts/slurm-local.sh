#!/usr/bin/env bash
# A real single-node Slurm (slurmctld + slurmd + munged) for tests and CI. Idempotent.
#
#   scripts/slurm-local.sh install   apt-get the Debian packages (root; skipped when installed)
#   scripts/slurm-local.sh start     install if needed, write slurm.conf, start munged/slurmctld/slurmd,
#                                    wait until the node is idle (no-op when already up)
#   scripts/slurm-local.sh stop      stop the three daemons (by the pids in their pid files)
#   scripts/slurm-local.sh status    exit 0 when the node takes jobs
#
# Runs as root (jobs run as root too: SlurmUser=root). State, logs and the conf's scratch dirs live
# in $HPCSERVE_SLURM_STATE (default /var/tmp/hpcserve-slurm); the conf goes to /etc/slurm/slurm.conf
# so that sbatch/squeue need no SLURM_CONF. The node advertises $HPCSERVE_SLURM_CPUS CPUs (default 8,
# more than the real cores, so several small jobs and 4-rank MPI steps fit at once).
set -euo pipefail

STATE=${HPCSERVE_SLURM_STATE:-/var/tmp/hpcserve-slurm}
CPUS=${HPCSERVE_SLURM_CPUS:-8}
CONF=/etc/slurm/slurm.conf
PKGS=(slurmctld slurmd slurm-client munge libpmix-dev openmpi-bin libopenmpi-dev)

die() { echo "slurm-local: $*" >&2; exit 1; }

installed() {
    local c
    for c in slurmctld slurmd sbatch srun munged; do command -v "$c" >/dev/null || [ -x "/usr/sbin/$c" ] || return 1; done
    ls /usr/lib/*/libpmix.so >/dev/null 2>&1
}

do_install() {
    installed && return 0
    [ "$(id -u)" = 0 ] || die "installing Slurm needs root (apt-get)"
    command -v apt-get >/dev/null || die "apt-get not found: install slurmctld, slurmd, slurm-client, munge and libpmix-dev by hand"
    echo "slurm-local: installing ${PKGS[*]}" >&2
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
        "${PKGS[@]}" >/dev/null
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

ready() {
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    local st; st=$(sinfo -h -N -o %T 2>/dev/null | head -1)
    [[ "$st" == idle* || "$st" == mixed* || "$st" == allocated* ]]
}

write_conf() {
    local node mem
    node=$(hostname -s)
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( ${mem:-2048} * 95 / 100 ))
    mkdir -p "$STATE/spool" "$STATE/ctld" "$STATE/log" /etc/slurm
    cat >"$CONF.new" <<EOF
# written by hpcserve scripts/slurm-local.sh (single-node Slurm for tests)
ClusterName=hpcserve-ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmdSpoolDir=$STATE/spool
StateSaveLocation=$STATE/ctld
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
SlurmdParameters=config_overrides
NodeName=$node NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if ! cmp -s "$CONF.new" "$CONF"; then mv "$CONF.new" "$CONF"; return 0; fi
    rm -f "$CONF.new"; return 1
}

do_start() {
    do_install
    [ "$(id -u)" = 0 ] || die "starting Slurm needs root"
    local changed=0
    write_conf && changed=1
    if [ "$changed" = 1 ] && alive "$STATE/slurmctld.pid"; then do_stop; fi
    install -d -o munge -g munge -m 0755 /run/munge
    [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || true; chown munge:munge /etc/munge/munge.key; }
    alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged --force
    alive "$STATE/slurmctld.pid" || /usr/sbin/slurmctld
    alive "$STATE/slurmd.pid" || /usr/sbin/slurmd
    for _ in $(seq 1 120); do
        if ready; then echo "slurm-local: node $(hostname -s) is up ($CPUS CPUs, state in $STATE)" >&2; return 0; fi
        sleep 0.5
    done
    die "Slurm did not become ready in 60 s; see $STATE/log/slurmctld.log and slurmd.log"
}

do_stop() {
    local f
    for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        if alive "$f"; then kill "$(cat "$f")"; fi
    done
    for _ in $(seq 1 40); do
        alive "$STATE/slurmd.pid" || alive "$STATE/slurmctld.pid" || return 0
        sleep 0.25
    done
}

case "${1:-}" in
    install) do_install ;;
    start) do_start ;;
    stop) do_stop ;;
    status) ready ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
