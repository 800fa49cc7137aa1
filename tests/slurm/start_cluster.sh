#!/usr/bin/env bash
# A one-node Slurm on localhost for tests/test_launch.py (the recipe in FACTS.md): munge + slurmctld + slurmd,
# partition "debug", preemption signals delivered to jobs. Needs root. Idempotent: a second call finds the daemons
# up and the config unchanged, and only waits for the node to be idle.
#
#   sudo tests/slurm/start_cluster.sh         # exit 0 once `sinfo` shows the node idle
#
# Exit codes: 0 ready, 3 not root, 4 slurm/munge not installable, 5 the node did not come up (logs printed).
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "start_cluster.sh: needs root (installs packages, starts munged/slurmctld/slurmd)" >&2
    exit 3
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    echo "start_cluster.sh: installing slurm-wlm and munge with apt" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null; }; then
        echo "start_cluster.sh: apt-get install slurm-wlm munge failed" >&2
        exit 4
    fi
fi

host=$(hostname -s)
cpus=$(nproc)
# Advertise 90% of the memory: slurmd drains a node that has less than its configured RealMemory.
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

# --- munge ----------------------------------------------------------------------------------------------------------
key=/etc/munge/munge.key
if [[ ! -s $key ]] || (( $(stat -c %s "$key") < 32 )); then
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
fi
chown munge:munge "$key"
chmod 400 "$key"
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    # --force: a stale socket or pid file from a killed daemon must not stop it.
    runuser -u munge -- munged --force
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# --- slurm.conf -----------------------------------------------------------------------------------------------------
state=/var/lib/slurm/slurmctld
spool=/var/lib/slurm/slurmd
mkdir -p /etc/slurm "$state" "$spool" /var/log/slurm
conf=$(cat <<EOF
# Written by ssltrain tests/slurm/start_cluster.sh: a one-node test cluster on localhost.
ClusterName=ssltrain
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs that ask no memory get 1 GB per CPU, not the whole node, so two small jobs can run side by side.
DefMemPerCPU=1000
ReturnToService=2
# Send the user signal (--signal=USR2@delay) on preemption too, so preempted jobs can checkpoint and requeue.
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
# A requeued job may start again cred_expire + 1 s after the requeue (default 120 s): keep the tests' requeues quick.
AuthInfo=cred_expire=10
# ... and the scheduler looks at pending jobs every 2 s rather than every 60 s / 30 s (main loop / backfill).
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=3600
StateSaveLocation=$state
SlurmdSpoolDir=$spool
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=0
if [[ ! -f /etc/slurm/slurm.conf ]] || [[ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]]; then
    printf '%s\n' "$conf" >/etc/slurm/slurm.conf
    changed=1
fi

# --- daemons --------------------------------------------------------------------------------------------------------
running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if (( changed )); then
    # A new config: restart what runs under the old one (only our own daemons, by their pid files).
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
    done
    for _ in $(seq 50); do running /run/slurmctld.pid || running /run/slurmd.pid || break; sleep 0.2; done
fi
if ! running /run/slurmctld.pid; then
    slurmctld
fi
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
if ! running /run/slurmd.pid; then
    slurmd
fi

# --- wait for the node ----------------------------------------------------------------------------------------------
for _ in $(seq 120); do
    node_state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case $node_state in
        idle|mixed|allocated) echo "start_cluster.sh: node $host $node_state"; exit 0 ;;
        down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
echo "start_cluster.sh: node $host did not become idle (state '${node_state:-none}')" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 5
