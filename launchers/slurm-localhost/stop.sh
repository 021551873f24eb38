#!/usr/bin/env bash
# stop.sh - stop the local cluster started by start.sh (same BASE).
# Only PIDs recorded in $BASE/run/*.pid (checked against the expected program
# name) and leftover job processes carrying SLURM_CONF=$BASE/etc/slurm.conf
# in their environment are signalled.  Usage: bash stop.sh [--quiet] [--purge]
set -u
BASE=${BASE:-${TMPDIR:-/tmp}/llmexp-slurm}
QUIET=0; PURGE=0
for a in "$@"; do case $a in --quiet) QUIET=1;; --purge) PURGE=1;; esac; done
say() { [ "$QUIET" = 1 ] || echo "[slurm-localhost stop] $*"; }
CONF=$BASE/etc/slurm.conf
[ -d "$BASE/run" ] || { say "nothing to stop ($BASE/run missing)"; exit 0; }
export SLURM_CONF=$CONF

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
stop_pidfiles() {  # stop_pidfiles "<pidfile>:<expected comm>" ...  (TERM all at once, then wait, then KILL)
  local spec f comm pid pids=() names=()
  for spec in "$@"; do
    f=${spec%%:*}; comm=${spec##*:}
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null)
    if alive "$pid" && [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$comm" ]; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid") && names+=("$comm($pid)")
    fi
    rm -f "$f"
  done
  [ ${#pids[@]} -eq 0 ] && { say "no daemons running"; return 0; }
  for _ in $(seq 150); do
    local left=0; for pid in "${pids[@]}"; do alive "$pid" && left=1; done
    [ $left = 0 ] && break; sleep 0.1
  done
  for pid in "${pids[@]}"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null && say "killed -9 pid $pid"; done
  say "stopped ${names[*]}"
}

# 1. cancel jobs while the controller is still up
if [ -f "$BASE/run/slurmctld.pid" ] && alive "$(cat "$BASE/run/slurmctld.pid")"; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    say "cancelled jobs: $jobs"
  fi
fi
# 2. all daemons together (the next start wipes state and DB anyway)
specs=(); for f in "$BASE"/run/slurmd-*.pid; do [ -e "$f" ] && specs+=("$f:slurmd"); done
stop_pidfiles "${specs[@]}" "$BASE/run/slurmctld.pid:slurmctld" "$BASE/run/slurmdbd.pid:slurmdbd" \
              "$BASE/run/mariadbd.pid:mariadbd" "$BASE/run/munged.pid:munged"
# 3. leftover slurmstepd / job processes of THIS cluster (identified by SLURM_CONF in their environment)
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  [ "$pid" = "$$" ] && continue
  grep -qzx "SLURM_CONF=$CONF" "$p/environ" 2>/dev/null || continue
  c=$(cat "$p/comm" 2>/dev/null)
  case $c in
    slurmstepd) ;;
    *) grep -qz '^SLURM_JOB_ID=' "$p/environ" 2>/dev/null || continue ;;  # spare the caller's own shells
  esac
  kill -KILL "$pid" 2>/dev/null && say "killed leftover $c ($pid)"
done
[ "$PURGE" = 1 ] && rm -rf "$BASE" && say "removed $BASE"
exit 0
