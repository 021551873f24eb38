#!/usr/bin/env bash
# start.sh - install (idempotently), configure and start a throw-away
# Slurm cluster that lives entirely on this machine and talks only over
# 127.0.0.1.  Meant for CI (root, no systemd, Debian 12 packages).
#
#   munged      private socket  $BASE/munge/munge.sock  (does not touch /run/munge)
#   mariadbd    127.0.0.1:$DB_PORT  (only with WITH_DBD=1; gives real sacct)
#   slurmdbd    127.0.0.1:$DBD_PORT (only with WITH_DBD=1)
#   slurmctld   localhost:$CTLD_PORT
#   slurmd x N  node1..nodeN, all on 127.0.0.1, ports $SLURMD_PORT0+i (multiple-slurmd build)
#
# Every node gets fake GPUs (GRES gpu:<type>:<n> backed by symlinks to /dev/null)
# and Features "gpu,<type>", so --gres=gpu:h100:1 / --gpus-per-node / --constraint=h100 work.
# Partitions: debug (all nodes, default), gpu (all nodes), urgent (all nodes,
# higher PriorityTier, preempts debug/gpu jobs with PreemptMode=REQUEUE).
#
# Usage:  bash start.sh            # start (or keep a healthy running one), prints READY
#         FRESH=1 bash start.sh    # always wipe state and restart
#         source $BASE/env.sh            # exports SLURM_CONF (clients need it, or the
#                                        # /etc/slurm/slurm.conf symlink made here)
#         bash stop.sh             # undoes everything this script did (see below)
#
# What it changes outside $BASE, each recorded in $BASE/undo so that stop.sh reverts exactly that:
#   /etc/hosts             one line "127.0.0.1 node1 node2  # slurm-localhost $BASE", for names that do not resolve
#   $ETC_CONF              a symlink to $BASE/etc/slurm.conf, if nothing is there (and its directory, if missing)
#   /usr/sbin/policy-rc.d  only while apt-get installs, only if missing; removed when this script exits
# Installed packages (slurm, munge, mariadb; first run only) stay installed.
#
# Tunables (environment):
#   BASE=${TMPDIR:-/tmp}/llmexp-slurm  NODES=2  CPUS_PER_NODE=4  MEM_PER_NODE_MB=4000
#   GPUS_PER_NODE=2  GPU_TYPES="h100 a100" (cycled over nodes)  WITH_DBD=1  NODE_PREFIX=node
#   CTLD_PORT=16817  SLURMD_PORT0=16830  DBD_PORT=16819  DB_PORT=13306
#   ADD_ETC_HOSTS=1  (append "127.0.0.1 node1 node2..." to /etc/hosts if they do not resolve)
#   LINK_ETC_CONF=1  (point ETC_CONF=/etc/slurm/slurm.conf, where clients without SLURM_CONF look,
#                     at this cluster's config unless something is there already)
#   SKIP_INSTALL=0   READY_TIMEOUT=60   FRESH=0
set -euo pipefail

BASE=${BASE:-${TMPDIR:-/tmp}/llmexp-slurm}
NODES=${NODES:-2}
CPUS_PER_NODE=${CPUS_PER_NODE:-4}
MEM_PER_NODE_MB=${MEM_PER_NODE_MB:-4000}
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
GPU_TYPES=(${GPU_TYPES:-h100 a100})
WITH_DBD=${WITH_DBD:-1}
CTLD_PORT=${CTLD_PORT:-16817}
SLURMD_PORT0=${SLURMD_PORT0:-16830}
DBD_PORT=${DBD_PORT:-16819}
DB_PORT=${DB_PORT:-13306}
ADD_ETC_HOSTS=${ADD_ETC_HOSTS:-1}
SKIP_INSTALL=${SKIP_INSTALL:-0}
READY_TIMEOUT=${READY_TIMEOUT:-60}
FRESH=${FRESH:-0}
LINK_ETC_CONF=${LINK_ETC_CONF:-1}
ETC_CONF=${ETC_CONF:-/etc/slurm/slurm.conf}
NODE_PREFIX=${NODE_PREFIX:-node}
CLUSTER=${CLUSTER:-ci}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[slurm-localhost %3d.%02ds] %s\n' $((ms / 1000)) $((ms % 1000 / 10)) "$*"; }
die() { log "ERROR: $*"; exit 1; }
# On the way out: the policy-rc.d made for apt, and, when the start failed after it began to
# change things, everything it changed (stop.sh; the logs in $BASE/log are kept to say why).
POLICY_MADE=0; CHANGING=0
on_exit() {
  local rc=$?
  [ "$POLICY_MADE" = 1 ] && rm -f /usr/sbin/policy-rc.d
  if [ "$rc" != 0 ] && [ "$CHANGING" = 1 ]; then
    BASE="$BASE" bash "$HERE/stop.sh" --quiet --keep; log "undid what this start changed; its logs are in $BASE/log"
  fi
}
trap on_exit EXIT
[ "$(id -u)" = 0 ] || die "must run as root (daemons run as root, SlurmUser=root)"

# ---------------------------------------------------------------- install
pkgs=(slurmctld slurmd slurm-client munge)
[ "$WITH_DBD" = 1 ] && pkgs+=(slurmdbd mariadb-server)
need_install=0
for b in slurmctld slurmd sbatch munged; do command -v $b >/dev/null || need_install=1; done
if [ "$WITH_DBD" = 1 ]; then
  for b in slurmdbd mariadbd mariadb-install-db; do command -v $b >/dev/null || need_install=1; done
fi
if [ "$need_install" = 1 ] && [ "$SKIP_INSTALL" != 1 ]; then
  log "installing ${pkgs[*]} (apt)"
  # keep package postinst scripts from starting system-wide munge/slurm/mariadb
  # (the marker line lets stop.sh remove one left behind by a start.sh that was killed)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# slurm-localhost start.sh: no service starts while it installs\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    POLICY_MADE=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt_log=$(mktemp "${TMPDIR:-/tmp}/slurm-localhost-apt.XXXXXX")
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >"$apt_log" 2>&1 \
    || { tail -20 "$apt_log"; die "apt-get install failed (full log $apt_log)"; }
  rm -f "$apt_log"
  log "installed: $(dpkg-query -W -f='${Package} ${Version}; ' "${pkgs[@]}")"
fi
command -v slurmctld >/dev/null || die "slurm not installed"
CONF=$BASE/etc/slurm.conf
export SLURM_CONF=$CONF   # without it every client does a DNS SRV lookup for a config and dies

# ---------------------------------------------------------------- already running?
# Same settings + same script + all daemons alive + nodes usable => keep it (idempotent).
SETTINGS="$NODES $CPUS_PER_NODE $MEM_PER_NODE_MB $GPUS_PER_NODE ${GPU_TYPES[*]} $WITH_DBD $CTLD_PORT $SLURMD_PORT0 $DBD_PORT $DB_PORT $CLUSTER $NODE_PREFIX $(cksum < "${BASH_SOURCE[0]}")"
running() {
  local f pids=("$BASE"/run/munged.pid "$BASE"/run/slurmctld.pid "$BASE"/run/slurmd-*.pid)
  [ "$WITH_DBD" = 1 ] && pids+=("$BASE"/run/slurmdbd.pid "$BASE"/run/mariadbd.pid)
  [ "$(cat "$BASE/run/settings" 2>/dev/null)" = "$SETTINGS" ] || return 1
  [ $(( ${#pids[@]} - (WITH_DBD == 1 ? 4 : 2) )) = "$NODES" ] || return 1
  for f in "${pids[@]}"; do [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null || return 1; done
  local st; st=$(timeout 10 sinfo -h -N -p debug -o %T 2>/dev/null | sort -u) && [ -n "$st" ] || return 1
  ! grep -qvxE 'idle|mixed|allocated|completing' <<<"$st"
}
if [ "$FRESH" != 1 ] && running; then
  log "READY: already running with the same settings, kept (FRESH=1 to restart); run:  source $BASE/env.sh"
  sinfo -N -o '%N %P %T %c %m %G %f'; exit 0
fi

# ---------------------------------------------------------------- clean slate
# $BASE is wiped below: only a directory this script made (its marker file) or an empty one
MARKER=$BASE/.slurm-localhost
if [ -e "$BASE" ] && [ ! -e "$MARKER" ] && [ ! -e "$BASE/run/settings" ] && [ -n "$(ls -A "$BASE" 2>/dev/null)" ]; then
  die "BASE=$BASE exists and was not made by this script; choose another BASE (it is wiped on every restart)"
fi
if [ -x "$HERE/stop.sh" ]; then BASE="$BASE" bash "$HERE/stop.sh" --quiet || true; fi
ports=($CTLD_PORT $(seq $SLURMD_PORT0 $((SLURMD_PORT0 + NODES - 1)))); [ "$WITH_DBD" = 1 ] && ports+=($DBD_PORT $DB_PORT)
for p in "${ports[@]}"; do
  if command -v ss >/dev/null && ss -ltnH "( sport = :$p )" 2>/dev/null | grep -q .; then die "port $p already in use: $(ss -ltnpH "( sport = :$p )")"; fi
done
rm -rf "$BASE"
mkdir -p "$BASE"/{etc,state,spool,log,run,munge,dev,mysql}
chmod 755 "$BASE" "$BASE/munge"   # munged insists the socket dir is world-executable
touch "$MARKER"
CHANGING=1
UNDO=$BASE/undo   # what this start changed outside $BASE, one "<kind> <what>" per line, for stop.sh
: > "$UNDO"

cat > "$BASE/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF
# clients started without SLURM_CONF read $ETC_CONF (else: DNS SRV lookup, then fatal);
# a file or link already there (a real cluster's, another test cluster's) is left alone
if [ "$LINK_ETC_CONF" = 1 ] && [ ! -e "$ETC_CONF" ] && [ ! -L "$ETC_CONF" ]; then
  made=(); d=$(dirname "$ETC_CONF"); while [ ! -e "$d" ]; do made=("$d" "${made[@]}"); d=$(dirname "$d"); done
  for d in "${made[@]}"; do mkdir "$d" && echo "dir $d" >> "$UNDO"; done   # outermost first: stop.sh removes them in reverse
  ln -s "$CONF" "$ETC_CONF" && echo "link $ETC_CONF" >> "$UNDO"
fi

# ---------------------------------------------------------------- node names
NODE_NAMES=(); for i in $(seq 1 "$NODES"); do NODE_NAMES+=("$NODE_PREFIX$i"); done
if [ "$ADD_ETC_HOSTS" = 1 ]; then
  missing=(); for n in "${NODE_NAMES[@]}"; do getent hosts "$n" >/dev/null || missing+=("$n"); done
  if [ ${#missing[@]} -gt 0 ]; then
    line="127.0.0.1 ${missing[*]}  # slurm-localhost $BASE"
    echo "$line" >> /etc/hosts && echo "hosts $line" >> "$UNDO"
    log "added to /etc/hosts: 127.0.0.1 ${missing[*]}"
  fi
fi

# slurmdbd has no bind address: NoInAddrAny makes it bind the address `hostname` resolves to,
# which must be loopback (slurmctld and slurmd bind the explicit 127.0.0.1 of SlurmctldHost/NodeAddr).
if [ "$WITH_DBD" = 1 ]; then
  hip=$(getent ahostsv4 "$(hostname)" | awk 'NR == 1 {print $1}')
  case $hip in 127.*) ;; *) die "hostname '$(hostname)' resolves to '${hip:-nothing}', not 127.x; add '127.0.0.1 $(hostname)' to /etc/hosts, or WITH_DBD=0";; esac
fi

# ---------------------------------------------------------------- munge
dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$BASE/munge/munge.key"
MSOCK=$BASE/munge/munge.sock
munged --socket="$MSOCK" --key-file="$BASE/munge/munge.key" --log-file="$BASE/log/munged.log" \
       --pid-file="$BASE/run/munged.pid" --seed-file="$BASE/munge/munged.seed"
munge -S "$MSOCK" -n | unmunge -S "$MSOCK" >/dev/null || die "munge self-test failed, see $BASE/log/munged.log"
log "munged up (pid $(cat "$BASE/run/munged.pid"))"

# ---------------------------------------------------------------- mariadb + slurmdbd
ACCT="AccountingStorageType=accounting_storage/none"
if [ "$WITH_DBD" = 1 ]; then
  mariadb-install-db --no-defaults --datadir="$BASE/mysql/data" --user=root \
      --auth-root-authentication-method=socket --skip-test-db > "$BASE/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed, see $BASE/log/mariadb-install.log"
  setsid mariadbd --no-defaults --user=root --datadir="$BASE/mysql/data" --socket="$BASE/mysql/mysqld.sock" \
      --pid-file="$BASE/run/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
      --log-error="$BASE/log/mariadbd.log" --innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
      --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
  for _ in $(seq 300); do mariadb-admin --no-defaults -S "$BASE/mysql/mysqld.sock" ping >/dev/null 2>&1 && break; sleep 0.1; done
  mariadb --no-defaults -S "$BASE/mysql/mysqld.sock" -u root -e \
    "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
    || die "mariadb did not come up, see $BASE/log/mariadbd.log"
  log "mariadbd up (pid $(cat "$BASE/run/mariadbd.pid"))"
  cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MSOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
# listen on the address of the hostname (127.0.0.1, checked above) instead of 0.0.0.0
CommunicationParameters=NoInAddrAny
SlurmUser=root
DebugLevel=info
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$BASE/etc/slurmdbd.conf"   # slurmdbd refuses a world-readable conf
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# munge socket used for talking to slurmdbd (AuthInfo socket= is NOT used for that)
AccountingStoragePass=$MSOCK
# so that sacct -o AllocTRES shows gres/gpu and gres/gpu:<type>
AccountingStorageTRES=gres/gpu$(printf ',gres/gpu:%s' "${GPU_TYPES[@]}")"
fi

# ---------------------------------------------------------------- slurm.conf / gres.conf
{
cat <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also = how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$MSOCK,cred_expire=10
# bind slurmd/slurmctld to 127.0.0.1 instead of 0.0.0.0 (slurmdbd always binds 0.0.0.0)
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
$ACCT
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
# jobs in partition 'urgent' (PriorityTier=10) preempt+requeue jobs in debug/gpu; the job's
# --signal (submitit: USR2) is sent at preemption time, then GraceTime before the kill
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=600
# allow declaring more CPUs / nodes than the hardware has
SlurmdParameters=config_overrides
GresTypes=gpu
EOF
i=0
for n in "${NODE_NAMES[@]}"; do
  t=${GPU_TYPES[$((i % ${#GPU_TYPES[@]}))]}
  gres=""; feat=""
  if [ "$GPUS_PER_NODE" -gt 0 ]; then gres=" Gres=gpu:$t:$GPUS_PER_NODE"; feat=" Feature=gpu,$t"; fi
  echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((SLURMD_PORT0 + i)) CPUs=$CPUS_PER_NODE RealMemory=$MEM_PER_NODE_MB$gres$feat State=UNKNOWN"
  i=$((i + 1))
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10"
echo "PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10"
echo "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10"
} > "$CONF"

{
echo "AutoDetect=off"
i=0
for n in "${NODE_NAMES[@]}"; do
  t=${GPU_TYPES[$((i % ${#GPU_TYPES[@]}))]}
  if [ "$GPUS_PER_NODE" -gt 0 ]; then
    mkdir -p "$BASE/dev/$n"
    # slurmd insists on a char/block device; a symlink to /dev/null passes the stat() check
    for g in $(seq 0 $((GPUS_PER_NODE - 1))); do ln -s /dev/null "$BASE/dev/$n/gpu$g"; done
    echo "NodeName=$n Name=gpu Type=$t File=$BASE/dev/$n/gpu[0-$((GPUS_PER_NODE - 1))]"
  fi
  i=$((i + 1))
done
} > "$BASE/etc/gres.conf"

# ---------------------------------------------------------------- daemons
if [ "$WITH_DBD" = 1 ]; then
  slurmdbd   # reads slurmdbd.conf from dirname($SLURM_CONF); daemonizes, writes pid file
  for _ in $(seq 300); do grep -q 'slurmdbd version .* started' "$BASE/log/slurmdbd.log" 2>/dev/null && break; sleep 0.1; done
  grep -q 'started' "$BASE/log/slurmdbd.log" || die "slurmdbd did not start, see $BASE/log/slurmdbd.log"
  sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
  log "slurmdbd up (pid $(cat "$BASE/run/slurmdbd.pid")), cluster '$CLUSTER' registered"
fi
slurmctld -f "$CONF"
for n in "${NODE_NAMES[@]}"; do mkdir -p "$BASE/spool/$n"; slurmd -f "$CONF" -N "$n"; done
log "slurmctld + ${#NODE_NAMES[@]} slurmd started; waiting for nodes to become idle"
wait_idle() {
  local st=""
  for _ in $(seq $((READY_TIMEOUT * 10))); do
    st=$(sinfo -h -N -p debug -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$st" = "idle " ] && return 0
    sleep 0.1
  done
  sinfo -N -l || true; die "nodes not idle after ${READY_TIMEOUT}s (state: $st); logs in $BASE/log"
}
wait_idle
srun -N "$NODES" -p debug -t 1 true || die "smoke-test srun failed"
wait_idle   # the smoke test leaves the nodes 'completing' for a moment
echo "$SETTINGS" > "$BASE/run/settings"
log "READY: cluster '$CLUSTER' with ${NODES} node(s); run:  source $BASE/env.sh"
sinfo -N -o '%N %P %T %c %m %G %f'
